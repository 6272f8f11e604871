"""Posterior prediction: the network under many weight samples, within a memory budget.

:func:`batched_forward` evaluates a model's network (its
:meth:`~pyro_bq.models.BayesianModel.functional_net`) for ``S`` weight samples
at once, in one of three ways: the samples folded into one pass
(:class:`~pyro_bq.inference.folded.FoldedNet`), one :func:`torch.func.vmap`
call, or one ordinary pass per sample. The default picks one by a rule on the
network (:func:`auto_strategy`), never by timing, so a seeded run gives the
same numbers every time.

:func:`predict_batched` draws ``num_samples`` joint weight samples from the
guide in one call (``guide.sample_latents``: parallel random streams, see
:mod:`pyro_bq._rng`), or takes given ones, and runs :func:`batched_forward`
over chunks of samples and inputs so that the activations of one pass fit a
byte budget.

:func:`predict_looped` evaluates the *same* samples one at a time through the
ordinary Pyro model with :class:`~pyro.infer.Predictive`; it is the reference
the vectorized path is checked against (same seed, same result up to float
rounding), and the path for Pyro models without ``functional_net``.
"""

from __future__ import annotations

import weakref
from typing import Mapping, Optional

import torch
from pyro.infer import Predictive
from torch.func import functional_call, vmap

from pyro_bq._validation import check_choice, check_int, resolve_device
from pyro_bq.models.bayesian import check_inputs

from .batches import module_mode
from .folded import FoldedNet, NotFoldable

__all__ = [
    "batched_forward",
    "predict_batched",
    "predict_looped",
    "auto_strategy",
    "activation_bytes_per_sample",
    "as_inputs",
    "check_draws",
    "STRATEGIES",
    "DEFAULT_MAX_BYTES",
]

#: ways :func:`batched_forward` evaluates many weight samples
STRATEGIES = ("auto", "folded", "vmap", "loop")

#: default memory budget for the activations of one pass (bytes)
DEFAULT_MAX_BYTES = 1 << 30

#: on CPU, a folded pass whose activations (all samples, all inputs) would exceed this many bytes
#: runs as a loop instead: each loop pass works within the cache, while the folded tensors do not
#: (an MLP 784-400-400-10 with 32 draws of 1,000 inputs: folded 1.9x, loop 1.05x the CPU time of
#: 32 deterministic passes, on 2 threads)
FOLD_CPU_MAX_BYTES = 8 << 20

# per model: its folded network, whether vmap cannot batch it, activation sizes
_MEMOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _memo(model, name: str) -> dict:
    return _MEMOS.setdefault(model, {}).setdefault(name, {})


def _check_model(model) -> None:
    if not callable(getattr(model, "functional_net", None)):
        raise TypeError(f"model must be a pyro_bq BayesianModel (with functional_net), got {type(model).__name__}")


def as_inputs(name: str, x) -> torch.Tensor:
    """``x`` checked as inputs ``(N, ...)``: a floating-point tensor, or a dataset's ``.x`` tensor.

    :raises TypeError, ValueError: naming ``name``.
    """
    if not isinstance(x, torch.Tensor) and isinstance(getattr(x, "x", None), torch.Tensor):
        x = x.x
    return check_inputs(name, x)


# -- one pass over many weight samples --------------------------------------------------------------
def _vmap(model, net, sampled, shared, x):
    return vmap(lambda params: functional_call(net, {**shared, **params}, (x,)))(sampled)


def _loop(model, net, sampled, shared, x):
    num = next(iter(sampled.values())).shape[0]
    return torch.stack([functional_call(net, {**shared, **{k: v[i] for k, v in sampled.items()}}, (x,))
                        for i in range(num)])


def _folded_net(model, net) -> Optional[FoldedNet]:
    """``net`` traced for the folded pass, or ``None`` where it uses unsupported operations."""
    memo = _memo(model, "folded")
    if "net" not in memo:
        try:
            memo["net"] = FoldedNet(net)
        except NotFoldable:
            memo["net"] = None
    return memo["net"]


def _folded(model, net, sampled, shared, x):
    out = _folded_or_none(model, net, sampled, shared, x)
    return _vmap(model, net, sampled, shared, x) if out is None else out


def _folded_or_none(model, net, sampled, shared, x):
    """The folded pass, or ``None`` where the network cannot be folded (an operation only seen at run
    time marks it unfoldable from then on)."""
    folded = _folded_net(model, net)
    if folded is None:
        return None
    try:
        return folded(sampled, {k: v for k, v in shared.items() if k not in sampled}, x)
    except NotFoldable:
        _memo(model, "folded")["net"] = None
        return None


_WAYS = {"folded": _folded, "vmap": _vmap, "loop": _loop}

#: the message of torch.func.vmap for an operation it cannot batch (e.g. ``aten::lstm``)
_NO_BATCHING_RULE = "Batching rule not implemented"


def _bytes_per_input(model, net, x: torch.Tensor) -> int:
    """Activation bytes of one pass of ``net`` per input row of ``x``'s shape (kept per model)."""
    cache = _memo(model, "bytes")
    key = (tuple(x.shape[1:]), x.dtype)
    if key not in cache:  # activations grow linearly with the number of inputs
        with model.shape_errors(x):
            cache[key] = activation_bytes_per_sample(net, x[:1])
    return max(cache[key], 1)


def _choose(model, net, num_samples: int, device: torch.device, x: torch.Tensor) -> str:
    """The rule of :func:`auto_strategy` for the parameter-free network ``net`` of ``model``."""
    if num_samples == 1:
        return "loop"
    if device.type == "cpu":
        if any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in net.modules()):
            return "loop"  # grouped convolutions run slower on CPU than one ordinary pass per draw
        if num_samples * len(x) * _bytes_per_input(model, net, x) > FOLD_CPU_MAX_BYTES:
            return "loop"  # folded tensors this large leave the cache; one pass per draw stays in it
    if _folded_net(model, net) is not None:
        return "folded"
    return "loop" if _memo(model, "auto").get("vmap_fails") else "vmap"


def auto_strategy(model, samples: Mapping[str, torch.Tensor], x: torch.Tensor) -> str:
    """The strategy ``batched_forward(model, samples, x, strategy="auto")`` uses.

    A rule on the network, the number of samples and the inputs' shape, never a
    timing, so a seeded run gives the same numbers on every run and in every process:
    ``"loop"`` for one sample, and on CPU for a network with convolutions
    (folded into grouped convolutions, a LeNet-5 with 20 draws of 500 inputs
    took 1.3 s against 0.7 s for the loop on 2 cores) or where the folded
    pass's activations would exceed :data:`FOLD_CPU_MAX_BYTES` (they leave the
    cache); else ``"folded"`` where the network folds, else
    ``"vmap"``, else ``"loop"`` (a network that ``vmap`` was found unable to
    batch, e.g. one with a Bayesian LSTM). Whether a network folds and
    batches is learnt on its first call and kept per model.

    Usage::

        logits = batched_forward(model, draws, x)
        auto_strategy(model, draws, x)      # e.g. "folded": record it next to the results
    """
    _check_model(model)
    net, sampled, _ = model.functional_net(samples, x)
    first = next(iter(sampled.values()))
    return _choose(model, net, first.shape[0], first.device, x)


def _auto(model, net, sampled, shared, x):
    """The strategy :func:`auto_strategy` names; falls to the next where the network turns out, at run
    time, not to fold or not to batch, and records that for the model."""
    first = next(iter(sampled.values()))
    num, device = first.shape[0], first.device
    chosen = _choose(model, net, num, device, x)
    if chosen == "folded":
        out = _folded_or_none(model, net, sampled, shared, x)
        if out is not None:
            return out
        chosen = _choose(model, net, num, device, x)
    if chosen == "vmap":
        try:
            return _vmap(model, net, sampled, shared, x)
        except RuntimeError as err:
            if _NO_BATCHING_RULE not in str(err):
                raise
            _memo(model, "auto")["vmap_fails"] = True
    return _loop(model, net, sampled, shared, x)


def batched_forward(model, samples: Mapping[str, torch.Tensor], x: torch.Tensor, *,
                    strategy: str = "auto") -> torch.Tensor:
    """The output site of ``model`` for ``S`` weight samples at once: shape ``(S, N, ...)``.

    ``samples`` maps every weight site to a tensor with a leading sample
    dimension ``S``. Deterministic parameters and buffers (e.g. BatchNorm)
    are shared across samples. The network runs in eval mode. Three ways to
    evaluate, all giving the same outputs up to float rounding (tested), and
    a default that picks one:

    * ``"folded"``: all samples in one pass with the samples folded into the
      tensors (:class:`~pyro_bq.inference.folded.FoldedNet`: grouped
      convolutions, stacked Linear weights), where the network's operations allow it;
    * ``"vmap"``: one :func:`torch.func.vmap` call over the samples;
    * ``"loop"``: one ordinary network pass per sample, with its weights swapped in;
    * ``"auto"`` (default): the strategy :func:`auto_strategy` names, a rule
      on the network (never a timing, so two runs with one seed give the same
      numbers to the last bit): ``folded`` where the network folds, else
      ``vmap``, else ``loop`` (networks that ``vmap`` cannot batch, e.g. with
      a Bayesian LSTM, fall back to ``loop``); ``loop`` for one sample.
      The strategies agree up to float rounding only, so record
      :func:`auto_strategy` with results that must be reproduced elsewhere.

    :param model: a :class:`~pyro_bq.models.BayesianModel` (anything with
        ``functional_net``, ``shape_errors`` and ``net_output``).
    :raises TypeError: for a model without ``functional_net``.
    :raises ValueError: for an unknown ``strategy``, ``"folded"`` on a network that cannot be folded, or
        ``"vmap"`` (or ``"folded"``, which falls back to it) on one that ``vmap`` cannot batch.

    Usage::

        logits = batched_forward(model, guide.sample_latents(16), x)   # (16, N, C)
    """
    _check_model(model)
    check_choice("strategy", strategy, STRATEGIES)
    net, sampled, shared = model.functional_net(samples, x)
    if strategy == "folded" and _folded_net(model, net) is None:
        raise ValueError(f"strategy='folded': {type(net).__name__} uses operations the folded pass does not "
                         "handle; use strategy='vmap' or 'auto'")
    try:
        with model.shape_errors(x):
            out = (_auto if strategy == "auto" else _WAYS[strategy])(model, net, sampled, shared, x)
    except RuntimeError as err:
        if _NO_BATCHING_RULE not in str(err):
            raise
        raise ValueError(f"strategy={strategy!r}: torch.func.vmap cannot batch an operation of "
                         f"{type(net).__name__} ({err}); use strategy='loop' or 'auto'") from err
    return model.net_output(out, sample_dims=1)


# -- chunks within a memory budget --------------------------------------------------------------------
@torch.no_grad()
def activation_bytes_per_sample(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of all layer outputs of one forward pass of ``net`` on ``x``, input included.

    Computed on the meta device (no real computation), by summing the sizes of
    every submodule's output.

    Usage::

        net = model.functional_net(draws, x)[0]
        activation_bytes_per_sample(net, x)
    """
    sizes = []

    def hook(_module, _inp, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
        functional_call(net, {k: torch.empty_like(v, device="meta") for k, v in state.items()}, (x.to("meta"),))
    finally:
        for h in handles:
            h.remove()
    return int(sum(sizes)) + x.numel() * x.element_size()


def _plan(model, samples, x, num_samples: int, batch_size, chunk_size, max_bytes: int) -> tuple[int, int]:
    """``(samples, inputs)`` per pass: ``batch_size`` inputs (default all) and as many samples as fit
    ``max_bytes``; fewer inputs where one sample on them does not fit."""
    key = (tuple(x.shape[1:]), x.dtype)
    if key not in _memo(model, "bytes"):
        probe = x[:1].to(next(iter(samples.values())).device)
        _bytes_per_input(model, model.functional_net({k: v[:1] for k, v in samples.items()}, probe)[0], probe)
    per_input = max(_memo(model, "bytes")[key], 1)
    rows = min(len(x), batch_size or len(x))
    if chunk_size is None:
        chunk_size = max(1, min(num_samples, max_bytes // (per_input * rows)))
    return chunk_size, max(1, min(rows, max_bytes // (per_input * chunk_size)))


def check_draws(samples, num_samples: Optional[int] = None) -> tuple[dict, int]:
    """``(samples, S)``: weight draws ``{site: (S, *shape)}`` checked to share ``S``, which must equal
    ``num_samples`` where that is given.

    :raises TypeError, ValueError: naming ``samples``.
    """
    if not isinstance(samples, Mapping) or not samples:
        raise TypeError("samples must be a non-empty dict mapping site names to tensors of shape (S, ...)")
    sizes = set()
    for name, value in samples.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            raise TypeError(f"samples[{name!r}] must be a tensor with a leading sample dimension")
        sizes.add(value.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"all entries of samples must have the same number of draws, got {sorted(sizes)}")
    s = sizes.pop()
    if num_samples is not None and num_samples != s:
        raise ValueError(f"num_samples={num_samples} disagrees with the {s} draws in samples; give one of them")
    return dict(samples), s


def _on_device(samples: dict, x: torch.Tensor, device) -> tuple[dict, torch.Tensor, torch.device]:
    """``device`` (default: where the draws are) and the draws on it; ``x`` stays where it is, and each
    slice of it follows with :func:`_rows`."""
    device = next(iter(samples.values())).device if device is None else resolve_device(device)
    return {k: v.to(device) for k, v in samples.items()}, x, device


def _rows(x: torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of ``x`` on ``device`` (asynchronously from pinned memory)."""
    part = x[start:stop]
    if part.device == device:
        return part
    return part.to(device, non_blocking=part.device.type == "cpu" and x.is_pinned())


def _draws(guide, num_samples: int, samples) -> tuple[dict, int]:
    """The weight draws (given, or ``num_samples`` from ``guide.sample_latents``) and their number."""
    if samples is not None:
        return check_draws(samples)
    if not callable(getattr(guide, "sample_latents", None)):
        raise TypeError(f"guide must be a pyro_bq guide (with sample_latents) when samples is not given, "
                        f"got {type(guide).__name__}")
    num_samples = check_int("num_samples", num_samples, low=1)
    return guide.sample_latents(num_samples), num_samples


@torch.no_grad()
def predict_batched(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int = 32,
    *,
    samples: Optional[Mapping[str, torch.Tensor]] = None,
    batch_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    device=None,
) -> torch.Tensor:
    """Network outputs for ``num_samples`` posterior weight samples: shape ``(S, N, ...)``.

    :param model: a :class:`~pyro_bq.models.BayesianModel` (e.g. ``BayesianClassifier``).
    :param guide: a trained pyro_bq guide (any :class:`~pyro_bq.guides.AutoGaussianSites`,
        quantized guides included: their ``sample_latents`` gives quantized samples);
        not needed when ``samples`` is given.
    :param x: inputs ``(N, ...)``, or a dataset with an ``.x`` tensor.
    :param num_samples: number of weight samples ``S`` (ignored when ``samples`` is given).
    :param samples: optional weight samples ``{site: (S, *shape)}`` to use instead
        of drawing them (e.g. to reuse draws).
    :param batch_size: inputs per pass; default all of them.
    :param chunk_size: samples per pass; default as many as fit ``max_bytes``.
    :param max_bytes: activation memory budget of one pass (bytes); inputs are
        split further if one sample on ``batch_size`` inputs does not fit.
    :param device: where the passes run (``"auto"``, ``"cpu"``, ``"cuda"``, a ``torch.device``);
        default: where the weight draws are, i.e. the guide's device. The model's network
        (its buffers, e.g. BatchNorm statistics) must be there too; ``x`` may stay on the
        CPU (pinned for asynchronous copies): each slice of it is moved in turn.
    :returns: logits (classifier) or means (regressor), ``(S, N, ...)``.
    :raises TypeError, ValueError: for bad arguments.

    Usage::

        pyro.set_rng_seed(0)
        logits = predict_batched(model, guide, x_test, num_samples=32)   # (32, N, C)
        probs = logits.softmax(-1).mean(0)
    """
    _check_model(model)
    x = as_inputs("x", x)
    max_bytes = check_int("max_bytes", max_bytes, low=1)
    batch_size = None if batch_size is None else check_int("batch_size", batch_size, low=1)
    chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, low=1)
    samples, num_samples = _draws(guide, num_samples, samples)
    samples, x, device = _on_device(samples, x, device)
    chunk_size, rows = _plan(model, samples, x, num_samples, batch_size, chunk_size, max_bytes)
    outs = []
    for s0 in range(0, num_samples, chunk_size):
        part = {k: v[s0 : s0 + chunk_size] for k, v in samples.items()}
        outs.append(torch.cat([batched_forward(model, part, _rows(x, r, r + rows, device))
                               for r in range(0, len(x), rows)], 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


@torch.no_grad()
def predict_looped(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int = 32,
    *,
    samples: Optional[Mapping[str, torch.Tensor]] = None,
    site: Optional[str] = None,
    batch_size: Optional[int] = None,
    device=None,
) -> torch.Tensor:
    """Reference for :func:`predict_batched`: the same draws, one Pyro model run each.

    Draws the weights exactly as :func:`predict_batched` does (so both give the
    same result under the same seed), then runs the ordinary model for each
    sample through :class:`~pyro.infer.Predictive` on ``batch_size`` inputs at a
    time (default all), in eval mode (BatchNorm uses its running statistics and
    does not update them; each module's mode is restored afterwards, as in
    :func:`predict_batched`, which runs an eval-mode copy), and returns its deterministic output site ``site``
    (default ``model.output_site``: ``"logits"`` for a classifier, ``"loc"``
    for a regressor). Any Pyro model works, given ``samples`` and ``site``.

    :param device: as in :func:`predict_batched`.
    :raises ValueError: if the model has no such site.

    Usage::

        pyro.set_rng_seed(0); fast = predict_batched(model, guide, x)
        pyro.set_rng_seed(0); slow = predict_looped(model, guide, x)
    """
    x = as_inputs("x", x)
    batch_size = len(x) if batch_size is None else check_int("batch_size", batch_size, low=1)
    samples, _ = _draws(guide, num_samples, samples)
    samples, x, device = _on_device(samples, x, device)
    site = getattr(model, "output_site", None) if site is None else site
    if not isinstance(site, str) or not site:
        raise ValueError(f"site: the model ({type(model).__name__}) names no output_site; pass site= the name "
                         "of its deterministic output site")
    predictive, outs = Predictive(model, posterior_samples=samples, return_sites=[site], parallel=False), []
    with module_mode(model, False):  # BatchNorm reads its running statistics and leaves them alone
        for r in range(0, len(x), batch_size):
            pred = predictive(_rows(x, r, r + batch_size, device))
            if site not in pred:
                raise ValueError(f"the model has no site {site!r}; pass site= the name of its output site")
            outs.append(pred[site])
    return torch.cat(outs, 1)
