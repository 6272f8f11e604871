"""The Dirty-MNIST study: train (or load) a BNN, quantize it many ways, evaluate every way.

Steps, each resumable:

1. data: Dirty-MNIST training set (MNIST + generated or original Ambiguous-MNIST)
   and the three test sets;
2. a deterministic LeNet-5 (``pretrain_epochs``), then a mean-field Normal guide
   started from it and trained with SVI (checkpoints every 200 steps, resumed);
3. one row per configuration (:meth:`StudyConfig.rows`): the guide is quantized
   (float, VPQ/SPQ/JQ at each bit width, the log-quantized guide, PWFN and the
   mixed-precision allocators when available), optionally with quantized
   activations, and evaluated on MNIST, Ambiguous-MNIST and Fashion-MNIST with
   the same weight-draw seed; its record, scores and an ArviZ InferenceData
   are written, and a finished row is skipped on a re-run;
4. the results table (Markdown, CSV, JSON) and the plots.

Parts of pyro_bq that this study uses but that may be missing are imported
lazily; rows that need a missing part are skipped with a log line that says why.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from .config import RowSpec, StudyConfig, check_out_dir
from .report import COLUMNS

__all__ = ["run_study", "StudyResult", "COLUMNS"]

log = logging.getLogger("pyro_bq.study")



class StudyResult(dict):
    """What :func:`run_study` returns: ``rows`` (list of records), ``skipped`` ({row: reason}), ``files``."""


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _atomic_json(path: Path, obj) -> None:
    from pyro_bq.io.container import atomic_write_bytes

    atomic_write_bytes(path, [json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode()])


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in JSON")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _bar(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def _load_data(cfg: StudyConfig):
    from pyro_bq.data.ambiguous import generate_ambiguous_mnist, find_original_ambiguous_mnist, save_image_grid
    from pyro_bq.data.dirty import DirtyMNIST, dirty_mnist_test_sets

    amnist_cfg = cfg.amnist_config()
    info = {}
    original = find_original_ambiguous_mnist(cfg.data_dir) if cfg.amnist_source != "generated" else None
    grid = cfg.out_path / "ambiguous_mnist_samples.png"
    if original is None:
        if cfg.amnist_source == "original":
            raise FileNotFoundError("amnist_source='original' but no amnist_samples.pt / amnist_labels.pt under data_dir")
        gen = generate_ambiguous_mnist(cfg.data_dir, cfg.cache_path, amnist_cfg, progress=cfg.progress)
        info = {"source": "generated", "cache": str(gen.path), "from_cache": gen.from_cache, **gen.stats}
        log.info(
            "Ambiguous-MNIST: generated (%s), mean ensemble entropy %.3f nats vs MNIST %.3f nats (ratio %.1f)",
            "from cache" if gen.from_cache else "new",
            gen.stats["mean_entropy_ambiguous"],
            gen.stats["mean_entropy_mnist"],
            gen.stats["mean_entropy_ambiguous"] / max(gen.stats["mean_entropy_mnist"], 1e-12),
        )
        if not grid.is_file():
            save_image_grid(gen.train_images[:128], grid, labels=gen.train_labels[:128],
                            title="generated Ambiguous-MNIST (captions: top-2 labels: count of 10)")
    else:
        info = {"source": "original", "folder": str(original)}
        log.info("Ambiguous-MNIST: original release files from %s", original)
    train = DirtyMNIST(
        cfg.data_dir, True, cache_dir=cfg.cache_path, source=cfg.amnist_source, config=amnist_cfg,
        mnist_limit=cfg.mnist_limit, seed=cfg.seed, progress=cfg.progress,
    )
    if original is not None and not grid.is_file():
        amb = train.x[train.is_ambiguous][:1280:10] * 0.3081 + 0.1307
        save_image_grid(amb, grid, title="original Ambiguous-MNIST")
    tests = dirty_mnist_test_sets(
        cfg.data_dir, cache_dir=cfg.cache_path, source=cfg.amnist_source, config=amnist_cfg,
        limit=cfg.eval_limit, seed=cfg.seed, progress=cfg.progress,
    )
    return train, tests, info


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------
def _pretrain(cfg: StudyConfig, train, folder: Path):
    """A deterministic LeNet-5 trained on Dirty-MNIST; resumed per epoch."""
    import torch.nn.functional as F

    from pyro_bq.io.checkpoint import load_checkpoint, save_checkpoint
    from pyro_bq.models.nets import LeNet5

    path = folder / "pretrained.bq"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = LeNet5()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    start = 0
    if path.is_file():
        state = load_checkpoint(path)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optim"])
        start = int(state["epoch"])
    if start >= cfg.pretrain_epochs:
        return net.eval()
    bar = _bar(cfg.pretrain_epochs * train.num_batches(cfg.batch_size), "pretrain LeNet-5", cfg.progress)
    bar.update(start * train.num_batches(cfg.batch_size))
    net.train()
    for epoch in range(start, cfg.pretrain_epochs):
        for xb, yb in train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed + 7, epoch=epoch):
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
        save_checkpoint(path, {"net": net.state_dict(), "optim": opt.state_dict(), "epoch": epoch + 1})
    bar.close()
    return net.eval()


def _make_model(cfg: StudyConfig, dataset_size: int):
    from pyro_bq.models import BayesianClassifier, LeNet5
    from pyro_bq.priors import LayerwiseNormal

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return BayesianClassifier(LeNet5(), LayerwiseNormal(cfg.prior_gain), dataset_size)


def _train_guide(cfg: StudyConfig, train, folder: Path):
    """The float mean-field guide: loaded from ``cfg.checkpoint`` / an earlier run, or trained."""
    from pyro_bq.guides import AutoMeanFieldNormal, init_to_pretrained
    from pyro_bq.inference import fit_svi
    from pyro_bq.io.checkpoint import load_checkpoint, save_checkpoint

    model = _make_model(cfg, len(train))
    final = folder / "guide.bq"
    source = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else final
    if source.is_file():
        state = load_checkpoint(source)
        guide = AutoMeanFieldNormal(model, init_scale=cfg.init_scale)
        guide.setup(train.x[:2], train.y[:2])
        guide.load_state_dict(state["guide"])
        log.info("float guide loaded from %s", source)
        return model, guide
    if cfg.checkpoint:
        raise FileNotFoundError(f"checkpoint {cfg.checkpoint!r} not found")
    net = _pretrain(cfg, train, folder) if cfg.pretrain_epochs > 0 else None
    init = init_to_pretrained(net) if net is not None else None
    guide = AutoMeanFieldNormal(model, init_loc_fn=init, init_scale=cfg.init_scale)
    t0 = time.time()
    result = fit_svi(
        model, guide, train, num_epochs=cfg.num_epochs, batch_size=cfg.batch_size, optim=_optim(cfg), seed=cfg.seed,
        checkpoint_dir=folder / "svi", checkpoint_every=200, progress=cfg.progress,
    )
    log.info("SVI: %d steps in %.0f s%s", result.steps, time.time() - t0,
             f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    save_checkpoint(final, {"guide": guide.state_dict(), "fingerprint": cfg.train_fingerprint()})
    return model, guide


def _optim(cfg: StudyConfig):
    """Adam with ``lr`` for the means and ``scale_lr`` (default ``lr``) for the scale parameters."""
    import pyro.optim

    scale_lr = cfg.lr if cfg.scale_lr is None else cfg.scale_lr

    def per_param(module_name, param_name):
        return {"lr": scale_lr if "scale" in param_name else cfg.lr}

    return pyro.optim.Adam(per_param)


def _train_logquant(cfg: StudyConfig, model, guide, train, folder: Path):
    """The log-quantized guide: started from the float guide, fine-tuned ``logquant_steps`` SVI steps."""
    from pyro_bq.guides.logquant import AutoLogQuantNormal
    from pyro_bq.inference import fit_svi

    locs = {name: guide.get_loc_scale(name)[0].detach().clone() for name in guide.sites}
    lq = AutoLogQuantNormal(model, bits=cfg.logquant_bits, init_loc_fn=lambda site: locs[site["name"]],
                            init_scale=cfg.init_scale)
    lq.setup(train.x[:2], train.y[:2])
    with torch.no_grad():
        _, scale = guide.flat_loc_scale()
        lq.log2_scale.copy_(torch.log2(scale.detach().clamp_min(1e-30)))
    fit_svi(model, lq, train, num_steps=cfg.logquant_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed + 1,
            checkpoint_dir=folder / f"logquant{cfg.logquant_bits}", checkpoint_every=100, progress=cfg.progress)
    return lq


# ---------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------
class _Builders:
    """Builds the guide of each row; caches guides shared by several rows."""

    def __init__(self, cfg, model, guide, train, folder):
        self.cfg, self.model, self.guide, self.train, self.folder = cfg, model, guide, train, folder
        self._cache = {}

    def guide_for(self, spec: RowSpec):
        fam = spec.family
        if fam == "float":
            return self.guide, {}
        if fam in ("vpq", "spq", "jq"):
            from pyro_bq.quant import make_policy, quantize

            site_bits = None
            if self.cfg.ends_bits is not None and self.cfg.ends_bits > spec.bits:
                site_bits = {name: self.cfg.ends_bits for name in _end_sites(self.guide)}
            extra = {"ends_bits": self.cfg.ends_bits, "end_sites": sorted(site_bits)} if site_bits else {}
            return quantize(self.guide, make_policy(fam, spec.bits, site_bits=site_bits)), extra
        if fam == "logquant":
            if "logquant" not in self._cache:
                self._cache["logquant"] = _train_logquant(self.cfg, self.model, self.guide, self.train, self.folder)
            return self._cache["logquant"], {"scale_bits": self.cfg.logquant_bits}
        raise ValueError(f"no builder for family {fam!r}")


def _end_sites(guide) -> list[str]:
    """The weight sites of the first and the last layer (e.g. ``net.conv1.*`` and ``net.fc3.*``)."""
    names = list(guide.sites)
    first, last = names[0].rsplit(".", 1)[0], names[-1].rsplit(".", 1)[0]
    return [n for n in names if n.rsplit(".", 1)[0] in (first, last)]


def _availability(cfg: StudyConfig) -> dict:
    """{family: None if available else reason} for the families that need other parts of pyro_bq."""
    import importlib

    needs = {
        "vpq": ("pyro_bq.quant", ("quantize", "make_policy", "memory_report")),
        "spq": ("pyro_bq.quant", ("quantize", "make_policy", "memory_report")),
        "jq": ("pyro_bq.quant", ("quantize", "make_policy", "memory_report")),
        "logquant": ("pyro_bq.guides.logquant", ("AutoLogQuantNormal",)),
        "pwfn": ("pyro_bq.pwfn", ("PWFN", "AutoPWFN")),
        "qi": ("pyro_bq.mixed", ("quantile_inform",)),
        "rb": ("pyro_bq.mixed", ("random_bits",)),
        "smol": ("pyro_bq.mixed", ("smol",)),
        "act": ("pyro_bq.quant.activation", ("quantize_activations",)),
    }
    out = {}
    for fam, (module, names) in needs.items():
        try:
            mod = importlib.import_module(module)
            missing = [n for n in names if not hasattr(mod, n)]
            out[fam] = None if not missing else f"{module} lacks {', '.join(missing)}"
        except Exception as err:  # ImportError, or a half-written module
            out[fam] = f"{module} cannot be imported ({type(err).__name__}: {err})"
    return out


def _memory(guide) -> tuple[float, int]:
    try:
        from pyro_bq.quant import memory_report

        rep = memory_report(guide)
        return float(rep.bits_per_param), int(rep.file_bytes)
    except Exception as err:  # a guide the packer does not know
        log.warning("memory_report failed for %s: %s", type(guide).__name__, err)
        return float("nan"), None


def _evaluate_row(cfg: StudyConfig, spec: RowSpec, model, guide, tests, train, row_dir: Path, extra: dict):
    from pyro_bq.io.container import write_container
    from pyro_bq.uncertainty import evaluate_details

    eval_model = model
    if spec.act_bits is not None:
        from pyro_bq.quant.activation import quantize_activations

        calib = train.x[torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.calib_rows]]
        eval_model = quantize_activations(model, spec.act_bits, guide=guide, data=calib)
    t0 = time.time()
    record, details = evaluate_details(
        eval_model, guide, tests["mnist"], tests["fashion"], ambiguous_data=tests["ambiguous"],
        num_samples=cfg.num_samples, seed=cfg.seed,
    )
    bpp, nbytes = _memory(guide)
    row = {
        "config": spec.name,
        "policy": spec.family,
        "bits": spec.bits,
        "act_bits": spec.act_bits,
        "accuracy": record["accuracy"],
        "nll": record["nll"],
        "ece": record["ece"],
        "auroc_mi_fashion": record["auroc_mi"],
        "auroc_ee_ambiguous": record["auroc_aleatoric_ambiguous"],
        "bits_per_param": bpp,
        "packed_bytes": nbytes,
        "details": {k: v for k, v in record.items() if k not in ("accuracy", "nll", "ece")},
        "eval_seconds": round(time.time() - t0, 2),
        **({"extra": extra} if extra else {}),
    }
    # per-input scores for the plots (pickle-free container)
    tensors = {}
    for key, name in (("in", "mnist"), ("ambiguous", "ambiguous"), ("ood", "fashion")):
        tensors[f"{name}_aleatoric"] = details[key]["aleatoric"].float()
        tensors[f"{name}_epistemic"] = details[key]["epistemic"].float()
    tensors["mnist_mean_probs"] = details["in"]["mean_probs"].float()
    tensors["mnist_y"] = tests["mnist"].y
    write_container(row_dir / f"{spec.name}.scores.bq", "study-scores", {"config": spec.name}, tensors)
    _write_arviz(cfg, eval_model, guide, tests, row_dir / f"{spec.name}.nc")
    return row


def _write_arviz(cfg, model, guide, tests, path: Path) -> None:
    from pyro_bq.uncertainty import to_arviz

    n = min(cfg.arviz_limit, len(tests["mnist"]))
    idata = to_arviz(model, guide, tests["mnist"].x[:n], tests["mnist"].y[:n], num_samples=cfg.arviz_samples, seed=cfg.seed)
    tmp = path.with_name(f".{path.name}.tmp")
    idata.to_netcdf(str(tmp), engine="h5netcdf")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------
def run_study(cfg: StudyConfig) -> StudyResult:
    """Run (or resume) the study described by ``cfg``; returns the rows and the files written.

    Usage::

        result = run_study(StudyConfig(data_dir="data", out_dir="runs/study"))
        print(result["files"]["markdown"])
    """
    if not isinstance(cfg, StudyConfig):
        raise TypeError(f"cfg must be a StudyConfig, got {type(cfg).__name__}")
    out = check_out_dir("out_dir", cfg.out_dir)
    check_out_dir("cache_dir", cfg.cache_path)
    fp = cfg.eval_fingerprint()
    train_dir = check_out_dir("out_dir", out / "train" / cfg.train_fingerprint())
    row_dir = check_out_dir("out_dir", out / "configs")
    _atomic_json(out / "study_config.json", {"config": cfg.to_dict(), "fingerprint": fp})

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    train, tests, data_info = _load_data(cfg)
    log.info("Dirty-MNIST: %d training rows (%d MNIST + %d ambiguous); test sets %s", len(train), train.num_mnist,
             train.num_ambiguous, {k: len(v) for k, v in tests.items()})

    avail = _availability(cfg)
    specs, skipped = [], {}
    for spec in cfg.rows():
        reason = avail.get(spec.family)
        if reason is None and spec.act_bits is not None:
            reason = avail["act"]
        if reason is None and spec.family in ("pwfn", "qi", "rb", "smol") and spec.family not in _ROW_HOOKS:
            reason = "the study has no driver for it yet"
        if reason is not None:
            skipped[spec.name] = reason
        else:
            specs.append(spec)
    for name, reason in skipped.items():
        log.warning("skipping row %s: %s", name, reason)

    rows, todo = {}, []
    for spec in specs:
        done = _read_json(row_dir / f"{spec.name}.json")
        files_ok = (row_dir / f"{spec.name}.nc").is_file() and (row_dir / f"{spec.name}.scores.bq").is_file()
        if done is not None and done.get("fingerprint") == fp and files_ok:
            rows[spec.name] = done["row"]
        else:
            todo.append(spec)
    if rows:
        log.info("resuming: %d finished configuration(s) skipped: %s", len(rows), ", ".join(rows))

    model = guide = None
    if todo or not (train_dir / "guide.bq").is_file():
        model, guide = _train_guide(cfg, train, train_dir)
    if todo:
        builders = _Builders(cfg, model, guide, train, train_dir)
        bar = _bar(len(todo), "study configurations", cfg.progress)
        for spec in todo:
            bar.set_postfix(config=spec.name)
            try:
                if spec.family in _ROW_HOOKS:
                    qguide, extra = _ROW_HOOKS[spec.family](builders, spec)
                else:
                    qguide, extra = builders.guide_for(spec)
                row = _evaluate_row(cfg, spec, model, qguide, tests, train, row_dir, extra)
            except Exception as err:
                if spec.family in ("float", "vpq", "spq", "jq"):
                    raise
                # rows backed by parts still in progress must not sink the study
                skipped[spec.name] = f"failed: {type(err).__name__}: {err}"
                log.warning("row %s failed and is skipped: %s: %s", spec.name, type(err).__name__, err)
                bar.update(1)
                continue
            _atomic_json(row_dir / f"{spec.name}.json", {"fingerprint": fp, "row": row})
            rows[spec.name] = row
            log.info("%s: acc %.4f  AUROC(MI, Fashion) %.4f  AUROC(EE, Ambiguous) %.4f  %.2f bits/param",
                     spec.name, row["accuracy"], row["auroc_mi_fashion"], row["auroc_ee_ambiguous"],
                     row["bits_per_param"])
            bar.update(1)
        bar.close()

    ordered = [rows[s.name] for s in specs if s.name in rows]
    from .plots import make_plots
    from .report import write_tables

    files = write_tables(ordered, out, skipped=skipped, data_info=data_info, config=cfg)
    files.update(make_plots(ordered, row_dir, out))
    files["ambiguous_grid"] = str(out / "ambiguous_mnist_samples.png")
    log.info("study finished in %.0f s; results in %s", time.time() - t_start, files["markdown"])
    return StudyResult(rows=ordered, skipped=skipped, files=files, data=data_info)


# Row builders for families implemented in other parts of pyro_bq, keyed by family.
# Each takes (builders, spec) and returns (guide, extra-info dict).
def _net_from_guide(b: "_Builders"):
    """A plain LeNet-5 holding the float guide's posterior means."""
    from pyro_bq.models.nets import LeNet5

    net = LeNet5()
    means = b.guide.median()
    net.load_state_dict({k[len("net."):]: v for k, v in means.items()}, strict=False)
    return net


def _row_pwfn(b: "_Builders", spec: RowSpec):
    from pyro_bq.guides import init_to_pretrained
    from pyro_bq.pwfn import PWFN, AutoPWFN, codebook_policy
    from pyro_bq.quant import quantize

    cfg = b.cfg
    guide = AutoPWFN(b.model, init_loc_fn=init_to_pretrained(_net_from_guide(b)))
    result = PWFN(
        b.model, guide, b.train, schedule=(0.5, 0.8, 0.95, 1.0), num_steps=cfg.extra_steps, batch_size=cfg.batch_size,
        lr=cfg.lr, seed=cfg.seed, checkpoint_dir=b.folder / "pwfn", eval_samples=4, progress=cfg.progress,
        log=lambda line: log.info("PWFN: %s", line),
    ).run()
    final = {k: v for k, v in (result.final or {}).items() if isinstance(v, (int, float, str))}
    # packed as indices into the codebook of means and the table of scales: the same guide, exactly
    return quantize(guide, codebook_policy(guide)), {"pwfn": final}


def _row_allocation(b: "_Builders", spec: RowSpec):
    from pyro_bq.mixed import allocation_policy, quantile_inform, random_bits, smol
    from pyro_bq.quant import quantize

    cfg, base = b.cfg, b.guide
    if spec.family == "qi":
        alloc = quantile_inform(base, cfg.mixed_bits)
    elif spec.family == "rb":
        alloc = random_bits(base, cfg.mixed_bits, num_steps=max(cfg.extra_steps, 50), seed=cfg.seed)
    else:
        alloc, base = smol(b.model, base, b.train, precision_steps=cfg.extra_steps, finetune_steps=cfg.extra_steps,
                           batch_size=cfg.batch_size, seed=cfg.seed)
    qguide = quantize(base, allocation_policy(alloc, "jq"))
    return qguide, {"method": alloc.method, "mean_bits": float(alloc.mean_bits), "layer_bits": {
        k: float(v) for k, v in alloc.layer_bits().items()}}


_ROW_HOOKS: dict = {"pwfn": _row_pwfn, "qi": _row_allocation, "rb": _row_allocation, "smol": _row_allocation}
