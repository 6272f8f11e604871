"""Side-by-side speed harness: SVI training steps and posterior prediction.

All variants of one network are measured in the same process, round-robin
(one call of each variant per round, ``--reps`` rounds), so that load from
other processes hits them alike; the table reports medians and ratios to the
plain PyTorch baseline of the same run. Peak memory of each row is measured in
a fresh subprocess (``--memory``): the growth of the peak resident set size
(``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs``
after the set-up, one warm-up call and handing the allocator's free memory back to the
system) over the resident size at that point,
during ``--memory-steps`` further calls. (``tracemalloc`` does not see torch's
allocations, so the operating system's count is used.) With ``--device cuda``
every row runs on the GPU, is timed with CUDA events after the warm-up, and its
memory is the growth of ``torch.cuda.max_memory_allocated`` over the bytes held
after the warm-up.

Networks (``--nets``): ``lenet`` and ``mlp`` on 1x28x28 random inputs,
``resnet20`` (CIFAR-style, BatchNorm, residual blocks) on 3x32x32 random inputs.

Training rows, batch 128, Adam(lr=1e-3), dataset size 60,000:

* ``det``       plain PyTorch deterministic step (cross-entropy)
* ``bbb-lr``    hand-written Bayes-by-backprop, local reparameterization
* ``bbb-w``     hand-written Bayes-by-backprop, weights sampled once per minibatch
* ``pyro-naive`` PyroSample priors + ``AutoNormal`` + ``TraceMeanField_ELBO``
* ``bbb-w-fused`` the same with torch's fused Adam (what ``bq`` uses), for a like-for-like optimizer
* ``bq``        pyro_bq default (what ``fit_svi`` uses): ``BayesianClassifier`` + ``AutoMeanFieldNormal``
  + :class:`pyro_bq.inference.MeanFieldELBO` + :func:`pyro_bq.inference.default_optim` (fused Adam)
* ``bq-stock``  the same model and guide with stock ``TraceMeanField_ELBO`` and ``pyro.optim.Adam``
* ``bq-lr``     the same under :class:`~pyro_bq.inference.reparam.LocalReparameterization`
* ``bq-lr-fc``  the same, local reparameterization on Linear layers only
* ``bq-flipout`` the same under :class:`~pyro_bq.inference.reparam.Flipout`
* ``bt``        bayesian-torch ``dnn_to_bnn`` (Reparameterization layers), if installed
* ``bt-flipout`` bayesian-torch Flipout layers, if installed

The bayesian-torch rows need ``pip install bayesian-torch==0.5.0`` (not a
dependency of pyro_bq); its ``dnn_to_bnn`` swaps the Linear and Conv2d layers and
leaves BatchNorm as it is, so ResNet-20 converts too.

Prediction rows, 32 weight samples over 1,000 images:

* ``det x32``       32 deterministic forward passes (no_grad, eval)
* ``bq batched``    :func:`pyro_bq.inference.prediction.predict_batched` (sampling included)
* ``Predictive loop`` stock ``Predictive(model, guide, num_samples=32)`` (sequential)
* ``bt x32``        32 bayesian-torch forward passes, if installed

Usage::

    python benchmarks/harness.py --reps 30 --threads 2
    python benchmarks/harness.py --nets mlp --skip-prediction --no-memory
    python benchmarks/harness.py --nets resnet20 --reps 10 --pred-reps 3
    python benchmarks/harness.py --nets resnet20 --skip-train --memory-only --threads 1
    python benchmarks/harness.py --nets resnet20 --rows bbb-w,bq,bt --pred-rows "bq batched,bt x32"
    python benchmarks/harness.py --nets lenet,mlp,resnet20 --device cuda --reps 50
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import MeanFieldELBO, default_optim
from pyro_bq.inference.prediction import predict_batched
from pyro_bq.inference.reparam import Flipout, LocalReparameterization
from pyro_bq.models import MLP, BayesianClassifier, LeNet5, ResNet20

try:  # optional: the bayesian-torch rows run only where it is installed
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss
except ImportError:
    dnn_to_bnn = get_kl_loss = None

DATASET_SIZE = 60000
BATCH = 128
LR = 1e-3
PRIOR_SCALE = 1.0
INIT_SCALE = 1e-2


NETS = ("lenet", "mlp", "resnet20")
#: the device every row runs on (``--device``); rows build their nets and data there
DEVICE = torch.device("cpu")


def make_net(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "lenet":
        net = LeNet5()
    elif name == "mlp":
        net = MLP((784, 400, 400, 10))
    elif name == "resnet20":
        net = ResNet20(num_classes=10, in_channels=3)
    else:
        raise ValueError(f"net must be one of {NETS}, got {name!r}")
    return net.to(DEVICE)


def input_shape(name: str) -> tuple:
    """Shape of one input of network ``name``: CIFAR-sized images for ResNet-20, MNIST-sized otherwise."""
    return (3, 32, 32) if name == "resnet20" else (1, 28, 28)


def data(n: int, seed: int = 0, net_name: str = "lenet"):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *input_shape(net_name), generator=g), torch.randint(0, 10, (n,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


# -- (a) plain PyTorch ---------------------------------------------------------------------
def det_step(net_name, batch=None):
    net = make_net(net_name)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    x, y = data(BATCH if batch is None else batch, 0, net_name)

    def step():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return step


# -- (b), (b2) hand-written Bayes-by-backprop -----------------------------------------------------
class _BBBLayer(nn.Module):
    """Mean-field Gaussian weights for one Linear/Conv2d layer (hand-written baseline)."""

    def __init__(self, layer: nn.Module, lr: bool):
        super().__init__()
        self.layer = layer  # kept for its hyper-parameters (stride, padding, ...)
        self.lr = lr
        self.w_mu = nn.Parameter(layer.weight.detach().clone())
        self.w_rho = nn.Parameter(torch.full_like(layer.weight, math.log(math.expm1(INIT_SCALE))))
        self.has_bias = layer.bias is not None
        if self.has_bias:  # ResNet-20's convolutions have none
            self.b_mu = nn.Parameter(layer.bias.detach().clone())
            self.b_rho = nn.Parameter(torch.full_like(layer.bias, math.log(math.expm1(INIT_SCALE))))
        del layer.weight, layer.bias

    def op(self, x, w, b):
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, self.layer.stride, self.layer.padding, self.layer.dilation, self.layer.groups)

    def forward(self, x):
        w_sigma = F.softplus(self.w_rho)
        b_sigma = F.softplus(self.b_rho) if self.has_bias else None
        if self.lr:
            mean = self.op(x, self.w_mu, self.b_mu if self.has_bias else None)
            var = self.op(x * x, w_sigma * w_sigma, b_sigma * b_sigma if self.has_bias else None)
            return mean + var.clamp_min(1e-30).sqrt() * torch.randn_like(mean)
        w = self.w_mu + w_sigma * torch.randn_like(w_sigma)
        b = self.b_mu + b_sigma * torch.randn_like(b_sigma) if self.has_bias else None
        return self.op(x, w, b)

    def kl(self):
        total = 0.0
        pairs = ((self.w_mu, self.w_rho), (self.b_mu, self.b_rho)) if self.has_bias else ((self.w_mu, self.w_rho),)
        for mu, rho in pairs:
            sigma = F.softplus(rho)
            total = total + (
                math.log(PRIOR_SCALE) - sigma.log() + (sigma * sigma + mu * mu) / (2 * PRIOR_SCALE**2) - 0.5
            ).sum()
        return total


def _bbbify(net: nn.Module, lr: bool) -> nn.Module:
    for name, child in list(net.named_children()):
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(net, name, _BBBLayer(child, lr))
        else:
            _bbbify(child, lr)
    return net


def bbb_step(net_name, lr: bool, fused: bool = False):
    net = _bbbify(make_net(net_name), lr)
    layers = [m for m in net.modules() if isinstance(m, _BBBLayer)]
    opt = torch.optim.Adam(net.parameters(), lr=LR, fused=True) if fused else torch.optim.Adam(net.parameters(), lr=LR)
    x, y = data(BATCH, 0, net_name)

    def step():
        opt.zero_grad()
        nll = F.cross_entropy(net(x), y, reduction="sum") * (DATASET_SIZE / BATCH)
        loss = nll + sum(layer.kl() for layer in layers)
        loss.backward()
        opt.step()

    return step


# -- (c) naive Pyro --------------------------------------------------------------------------------
def naive_pyro_model(net_name):
    net = make_net(net_name)
    to_pyro_module_(net)
    for module in list(net.modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for pname in ("weight", "bias"):
                if getattr(module, pname) is None:
                    continue
                shape = getattr(module, pname).shape
                setattr(module, pname, PyroSample(dist.Normal(torch.zeros((), device=DEVICE), PRIOR_SCALE).expand(shape).to_event(len(shape))))

    class Model(PyroModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, y=None):
            logits = self.net(x)
            with pyro.plate("data", DATASET_SIZE, subsample_size=x.shape[0]):
                pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
            return logits

    return Model()


def naive_pyro_step(net_name):
    model = naive_pyro_model(net_name)
    guide = AutoNormal(model, init_scale=INIT_SCALE)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), TraceMeanField_ELBO())
    x, y = data(BATCH, 0, net_name)
    svi.step(x, y)
    return lambda: svi.step(x, y)


# -- (d), (e), (f) pyro_bq ---------------------------------------------------------------------------
_BQ_CACHE: Dict[str, tuple] = {}


def bq_setup(net_name):
    """One model + guide per network, shared by the pyro_bq rows (one param store)."""
    if net_name not in _BQ_CACHE:
        pyro.clear_param_store()
        model = BayesianClassifier(make_net(net_name), IIDNormal(PRIOR_SCALE), DATASET_SIZE)
        guide = AutoMeanFieldNormal(model, init_scale=INIT_SCALE)
        x, y = data(BATCH, 0, net_name)
        guide(x, y)
        _BQ_CACHE.clear()
        _BQ_CACHE[net_name] = (model, guide)
    return _BQ_CACHE[net_name]


def bq_step(net_name, handler=None, stock=False):
    model, guide = bq_setup(net_name)
    if stock:  # stock Pyro optimizer and ELBO
        svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), TraceMeanField_ELBO())
    else:
        svi = SVI(model, guide, default_optim(LR), MeanFieldELBO())
    x, y = data(BATCH, 0, net_name)
    if handler is None:
        return lambda: svi.step(x, y)

    def step():
        with handler:
            svi.step(x, y)

    return step


# -- (g) bayesian-torch ------------------------------------------------------------------------------
def have_bayesian_torch() -> bool:
    return dnn_to_bnn is not None


def bt_net(net_name, kind="Reparameterization"):
    net = make_net(net_name)
    dnn_to_bnn(
        net,
        {
            "prior_mu": 0.0,
            "prior_sigma": PRIOR_SCALE,
            "posterior_mu_init": 0.0,
            "posterior_rho_init": math.log(math.expm1(INIT_SCALE)),
            "type": kind,
            "moped_enable": False,
        },
    )
    return net


def bt_step(net_name, kind="Reparameterization"):
    net = bt_net(net_name, kind)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    x, y = data(BATCH, 0, net_name)

    def step():
        opt.zero_grad()
        nll = F.cross_entropy(net(x), y, reduction="sum") * (DATASET_SIZE / BATCH)
        (nll + get_kl_loss(net)).backward()
        opt.step()

    return step


# -- prediction -----------------------------------------------------------------------------------------
PRED_N, PRED_S = 1000, 32


def _repeated_passes(net, net_name):
    """``PRED_S`` forward passes of ``net`` (eval mode) over the prediction inputs."""
    net = net.eval()
    x, _ = data(PRED_N, 1, net_name)

    @torch.no_grad()
    def run():
        for _ in range(PRED_S):
            net(x)

    return run


def pred_det(net_name):
    return _repeated_passes(make_net(net_name), net_name)


def pred_bq(net_name):
    model, guide = bq_setup(net_name)
    x, _ = data(PRED_N, 1, net_name)
    return lambda: predict_batched(model, guide, x, num_samples=PRED_S)


def pred_loop(net_name):
    model, guide = bq_setup(net_name)
    x, _ = data(PRED_N, 1, net_name)
    pred = Predictive(model, guide=guide, num_samples=PRED_S, return_sites=["logits"])

    @torch.no_grad()
    def run():
        pred(x)

    return run


def pred_bt(net_name):
    return _repeated_passes(bt_net(net_name), net_name)  # bayesian-torch layers sample their weights on every pass


# -- registry ---------------------------------------------------------------------------------------------
def train_rows(net_name) -> Dict[str, Callable[[], Callable[[], None]]]:
    rows = {
        "det": lambda: det_step(net_name),
        "bbb-lr": lambda: bbb_step(net_name, lr=True),
        "bbb-w": lambda: bbb_step(net_name, lr=False),
        "bbb-w-fused": lambda: bbb_step(net_name, lr=False, fused=True),
        "pyro-naive": lambda: naive_pyro_step(net_name),
        "bq": lambda: bq_step(net_name),
        "bq-stock": lambda: bq_step(net_name, stock=True),
        "bq-lr": lambda: bq_step(net_name, LocalReparameterization()),
        "bq-flipout": lambda: bq_step(net_name, Flipout()),
    }
    if net_name == "lenet":
        rows["bq-lr-fc"] = lambda: bq_step(net_name, LocalReparameterization(layers=("linear",)))
    if have_bayesian_torch():
        rows["bt"] = lambda: bt_step(net_name)
        rows["bt-flipout"] = lambda: bt_step(net_name, "Flipout")
    return rows


def pred_rows(net_name) -> Dict[str, Callable[[], Callable[[], None]]]:
    rows = {
        "det x32": lambda: pred_det(net_name),
        "bq batched": lambda: pred_bq(net_name),
        "Predictive loop": lambda: pred_loop(net_name),
    }
    if have_bayesian_torch():
        rows["bt x32"] = lambda: pred_bt(net_name)
    return rows


def timed(fn: Callable[[], None]) -> float:
    """Seconds one call of ``fn`` takes: wall clock on the CPU; CUDA events around it on a GPU (the
    end event is waited for, so queued kernels count)."""
    if DEVICE.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(DEVICE)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def round_robin(fns: Dict[str, Callable[[], None]], reps: int, warmup: int) -> Dict[str, list]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return times


# -- memory (fresh subprocess per row) ------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    """Hand the allocator's free memory back to the system (glibc ``malloc_trim``), so that the resident
    size the peak is measured from counts live memory only: freed heap memory a row reuses on its next
    call would otherwise sit in that base and hide part of the row's working memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the base may include retained free memory
        pass


def memory_child(kind: str, net_name: str, row: str, steps: int) -> None:
    rows = train_rows(net_name) if kind == "train" else pred_rows(net_name)
    fn = rows[row]()
    fn()  # one warm-up call: lazy imports and one-off buffers are not a step's working memory
    gc.collect()
    if DEVICE.type == "cuda":  # the caching allocator's peak of allocated bytes, over those held after warm-up
        torch.cuda.synchronize(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(DEVICE)
        print(json.dumps({"peak_delta": torch.cuda.max_memory_allocated(DEVICE) - base}))
        return
    _release_free_heap()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    for _ in range(steps):
        fn()
    print(json.dumps({"peak_delta": _status("VmHWM") - base}))


def memory_of(kind: str, net_name: str, row: str, steps: int, threads: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", kind, net_name, row, "--memory-steps", str(steps),
           "--threads", str(threads), "--device", str(DEVICE)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:  # reported, and the row's figure left blank
        print(f"memory of {kind} row {row!r} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta"] / 2**20


# -- main --------------------------------------------------------------------------------------------------------
def table(title, times, base, mem, ref_rows=()):
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"### {title}", "", "| variant | median ms | x `" + base + "` | " + " | ".join(f"x `{r}`" for r in ref_rows) + (" | " if ref_rows else "") + "peak MiB |",
             "|---|---:|---:|" + "---:|" * len(ref_rows) + "---:|"]
    for k, v in med.items():
        refs = "".join(f" {v / med[r]:.2f} |" for r in ref_rows if r in med)
        m = mem.get(k, float("nan"))
        lines.append(f"| {k} | {v * 1e3:.2f} | {v / med[base]:.2f} |{refs} {m:.1f} |")
    return "\n".join(lines), med


def select(rows: dict, names, base: str) -> dict:
    """The rows named in the comma-separated ``names`` (all where ``None``), with the baseline ``base``
    always first.

    :raises ValueError: naming a row that does not exist (e.g. a bayesian-torch row where it is not installed).
    """
    if names is None:
        return rows
    wanted = [n for n in names.split(",") if n]
    unknown = [n for n in wanted if n not in rows]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose among {sorted(rows)}")
    return {k: rows[k] for k in [base] + [n for n in wanted if n != base]}


def memory_table(title: str, kind: str, net_name: str, rows: dict, args) -> str:
    """Markdown table of each row's peak-memory growth (MiB, fresh subprocess) and its ratio to the first row."""
    steps = args.memory_steps if kind == "train" else 1
    mem = {k: memory_of(kind, net_name, k, steps, args.threads) for k in rows}
    base = next(iter(mem.values()))
    lines = [f"### {title}", "", f"| variant | peak MiB | x `{next(iter(mem))}` |", "|---|---:|---:|"]
    lines += [f"| {k} | {m:.1f} | {m / base:.2f} |" for k, m in mem.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="lenet,mlp")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pred-reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-prediction", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-steps", type=int, default=5)
    p.add_argument("--rows", default=None, help="comma-separated subset of training rows")
    p.add_argument("--pred-rows", default=None, help="comma-separated subset of prediction rows")
    p.add_argument("--memory-only", action="store_true", help="measure peak memory only, no timing")
    p.add_argument("--memory-child", nargs=3, metavar=("KIND", "NET", "ROW"), help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the medians here")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]: build every row there; CUDA rows are "
                   "timed with CUDA events after the warm-up, their memory is the allocator's peak")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if args.memory_child:
        memory_child(*args.memory_child, steps=args.memory_steps)
        return
    pyro.enable_validation(True)  # Pyro's default; the user's choice
    print(f"# pyro_bq speed harness: torch {torch.__version__}, device {DEVICE}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start\n")
    results = {}
    for net_name in args.nets.split(","):
        if not args.skip_train:
            rows = select(train_rows(net_name), args.rows, "det")
            if args.memory_only:
                print(memory_table(f"{net_name}: peak memory of one training step", "train", net_name, rows, args))
                continue
            fns = {k: make() for k, make in rows.items()}
            times = round_robin(fns, args.reps, args.warmup)
            mem = {} if args.no_memory else {k: memory_of("train", net_name, k, args.memory_steps, args.threads) for k in rows}
            text, med = table(
                f"{net_name}: one training step, batch {BATCH} ({args.reps} round-robin rounds)", times, "det", mem,
                [r for r in ("bbb-w", "bbb-lr", "pyro-naive", "bt") if r in rows],
            )
            print(text + "\n", flush=True)
            results[f"{net_name}/train"] = med
        if not args.skip_prediction:
            rows = select(pred_rows(net_name), args.pred_rows, "det x32")
            if args.memory_only:
                print(memory_table(f"{net_name}: peak memory of prediction, {PRED_S} samples x {PRED_N} images",
                                   "pred", net_name, rows, args))
                continue
            fns = {k: make() for k, make in rows.items()}
            times = round_robin(fns, args.pred_reps, 1)
            mem = {} if args.no_memory else {k: memory_of("pred", net_name, k, 1, args.threads) for k in rows}
            text, med = table(
                f"{net_name}: prediction, {PRED_S} samples x {PRED_N} images ({args.pred_reps} rounds)", times, "det x32", mem
            )
            print(text + "\n", flush=True)
            results[f"{net_name}/pred"] = med
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
