"""Activation quantization for Bayesian models.

:func:`quantize_activations` returns a *new* model whose activation modules
are replaced by :class:`FakeQuantActivation`: the activation function (the
original one, or a bounded one such as ReLU6 or hardtanh) followed by a
``bits``-bit uniform grid over a calibrated range
(:func:`~pyro_bq.quant.grids.interval_grid`, no zero point). The weight site names are
unchanged, so a guide trained on the original model still fits the new one.

Ranges are calibrated per *call* of an activation module (LeNet-5 uses one
``act`` module four times; each use gets its own range) by
:func:`calibrate_activations_`, on data and on several posterior weight
samples: the range covers the activations of every sample, so the
quantization grid does not clip away the differences between samples, which
is where the epistemic uncertainty lives. A bounded activation never leaves
its natural range (``[0, 6]`` for ReLU6, ``[-1, 1]`` for hardtanh), so its
grid is fixed by the function itself and the same for every weight sample;
with ``range="natural"`` no data is needed. A plain ReLU has no upper bound,
so its range must be calibrated: until :func:`calibrate_activations_` has set
it, a calibrated activation raises :class:`UncalibratedActivationError` when it
runs (an empty range would map every value to 0, so every input would get the
same prediction).
"""

from __future__ import annotations

import copy
import itertools
from typing import Optional, Union

import pyro.poutine as poutine
import torch
from torch import nn

from pyro_bq._validation import check_choice, check_int, resolve_device

from .grids import check_bits, interval_grid, ste, uniform_quantize

__all__ = ["FakeQuantActivation", "quantize_activations", "calibrate_activations_", "check_calibrated",
           "UncalibratedActivationError", "BOUNDED_ACTIVATIONS", "round_to_grid"]

#: what :func:`quantize_activations` uses of a :class:`~pyro_bq.models.BayesianModel` (duck-typed, so that
#: this tensor-level package imports no model code)
_MODEL_ATTRIBUTES = ("net", "_template", "_initial_params", "weight_sites", "prior", "dataset_size")
#: activation names accepted by :func:`quantize_activations`
BOUNDED_ACTIVATIONS = {"relu6": lambda: nn.ReLU6(), "hardtanh": lambda: nn.Hardtanh()}
_ACTIVATIONS = {**BOUNDED_ACTIVATIONS, "relu": lambda: nn.ReLU()}
_REPLACEABLE = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)


class UncalibratedActivationError(RuntimeError):
    """A :class:`FakeQuantActivation` with ``range="calibrated"`` ran before its range was calibrated.

    Usage::

        try:
            qmodel(x)
        except UncalibratedActivationError:
            calibrate_activations_(qmodel, guide, x_calib)
    """


_CALIBRATE_HINT = ("call calibrate_activations_(qmodel, guide, x_calib) first, or build the model with "
                   "quantize_activations(model, bits, guide=guide, data=x_calib); range='natural' needs no data "
                   "for bounded activations (ReLU6, Hardtanh, Tanh, Sigmoid)")


def _natural_range(act: nn.Module):
    if isinstance(act, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(act, nn.Hardtanh):  # ReLU6 is a Hardtanh too; checked first
        return float(act.min_val), float(act.max_val)
    if isinstance(act, nn.Tanh):
        return -1.0, 1.0
    if isinstance(act, nn.Sigmoid):
        return 0.0, 1.0
    return None


class _ResetCalls:
    """Forward pre-hook of the root network: restart the call counters of its fake-quant activations."""

    def __init__(self, modules):
        self.modules = list(modules)

    def __call__(self, module, args):
        for m in self.modules:
            m._call = 0
        return None


class FakeQuantActivation(nn.Module):
    """An activation followed by ``bits``-bit fake quantization over a per-call range.

    :param activation: the activation module (e.g. ``nn.ReLU6()``).
    :param bits: an int from 1 to 16.
    :param range: ``"calibrated"`` (set by :func:`calibrate_activations_`) or
        ``"natural"`` (the bounds of a bounded activation).
    :param max_calls: how many uses per forward pass the module supports.

    The forward value is on the grid; the gradient passes straight through.
    With ``range="calibrated"`` the module raises :class:`UncalibratedActivationError`
    until :func:`calibrate_activations_` has set the range of each of its uses.

    Usage::

        act = FakeQuantActivation(nn.ReLU6(), bits=4, range="natural")
        y = act(torch.randn(3, 5))
    """

    def __init__(self, activation: nn.Module, bits: int = 8, *, range: str = "calibrated", max_calls: int = 16):
        super().__init__()
        if not isinstance(activation, nn.Module):
            raise TypeError(f"activation must be an nn.Module, got {type(activation).__name__}")
        self.activation = activation
        self.bits = check_bits("bits", bits, allow_tensor=False)
        self.range = check_choice("range", range, ("calibrated", "natural"))
        max_calls = check_int("max_calls", max_calls, low=1)
        natural = _natural_range(activation)
        if range == "natural" and natural is None:
            raise ValueError(f"range='natural' needs a bounded activation (ReLU6, Hardtanh, Tanh, Sigmoid), "
                             f"got {type(activation).__name__}; use range='calibrated'")
        lo, hi = natural if natural is not None else (0.0, 0.0)
        self.register_buffer("lo", torch.full((max_calls,), lo))
        self.register_buffer("hi", torch.full((max_calls,), hi))
        self.register_buffer("ready", torch.full((max_calls,), range == "natural"))
        self._call = 0
        self._stats: Optional[dict] = None

    def forward(self, x):
        y = self.activation(x)
        k = self._call
        self._call += 1
        if k >= self.lo.numel():
            raise RuntimeError(f"FakeQuantActivation was called {k + 1} times in one forward pass; "
                               f"build it with max_calls >= {k + 1}")
        if self._stats is not None:  # calibration: record the range of this call
            lo, hi = float(y.detach().min()), float(y.detach().max())
            old = self._stats.get(k)
            self._stats[k] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
            return y
        if self.ready.device.type != "meta" and not bool(self.ready[k]):  # meta: a memory estimate, no values
            raise UncalibratedActivationError(
                f"FakeQuantActivation({type(self.activation).__name__}, bits={self.bits}) use {k + 1} has no "
                f"calibrated range (it is 0..0, so every value would become 0 and every input would get the "
                f"same prediction); {_CALIBRATE_HINT}")
        grid = interval_grid(self.lo[k], self.hi[k], self.bits)
        if y.requires_grad:
            return ste(y, uniform_quantize(y.detach(), *grid))
        return round_to_grid(y, *grid)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range={self.range!r}"


def round_to_grid(y: torch.Tensor, step, zp, qmax) -> torch.Tensor:
    """:func:`~pyro_bq.quant.grids.uniform_quantize` of ``y``, bit for bit, in one new tensor.

    The same operations in the same order (divide by ``step``, add ``zp``, round, clip to
    ``[0, qmax]``, subtract ``zp``, multiply by ``step``), run in place on one copy of
    ``y``: one allocation instead of seven. For values that need no gradient (evaluation);
    ``y`` itself is not changed.

    Usage::

        y_q = round_to_grid(torch.rand(4, 8), *interval_grid(torch.tensor(0.0), torch.tensor(1.0), 8))
    """
    q = torch.div(y, step)
    q.add_(zp).round_().clamp_(min=0)
    torch.minimum(q, qmax, out=q)
    return q.sub_(zp).mul_(step)


def _check_activation_class(cls: type) -> type:
    """Check that ``cls`` is an activation module class that builds without arguments (e.g. ``nn.ReLU6``).

    Torch's own layers that are not activations (``nn.Linear``, ``nn.Conv2d``, ``nn.Flatten``, ...) are refused.

    :raises TypeError: naming ``activation``.
    """
    module = getattr(cls, "__module__", "")
    if module.startswith("torch.nn.") and module != "torch.nn.modules.activation":
        raise TypeError(f"activation must be an activation module class (e.g. nn.ReLU6, nn.Hardtanh, nn.GELU) or one "
                        f"of {sorted(_ACTIVATIONS)}; {cls.__name__} is not an activation")
    try:
        cls()
    except Exception as err:  # noqa: BLE001 - any failure means the class cannot be used here
        raise TypeError(f"activation class {cls.__name__} must build without arguments (activation=cls is called "
                        f"as cls()); it failed with {type(err).__name__}: {err}. Pass an activation such as nn.ReLU6") from None
    return cls


def _plain_net(model) -> nn.Module:
    """A plain (non-Pyro) copy of ``model``'s network with its current deterministic parameters."""
    net = copy.deepcopy(model._template).to_empty(device="cpu")
    state = model.net.state_dict()
    own = net.state_dict()
    for key, value in own.items():
        src = state.get(key)
        if src is None:
            src = model._initial_params.get(f"net.{key}")
        if src is not None:
            value.copy_(src)
    return net


def quantize_activations(
    model,
    bits: int = 8,
    *,
    activation: Union[None, str, type] = None,
    range: str = "calibrated",
    guide=None,
    data=None,
    num_samples: int = 8,
    max_calls: int = 16,
    seed: int = 0,
    device=None,
):
    """A new model whose activations are quantized to ``bits`` bits (``model`` is untouched).

    :param model: a :class:`~pyro_bq.models.BayesianClassifier` (or another
        :class:`~pyro_bq.models.BayesianModel` whose constructor takes ``(net, prior, dataset_size)``).
    :param activation: replace every activation module by ``"relu6"``,
        ``"hardtanh"``, ``"relu"`` or an ``nn.Module`` class; ``None`` keeps
        the network's own activation functions.
    :param range: ``"calibrated"`` or ``"natural"`` (bounded activations only).
    :param guide, data, num_samples, seed: when given, calibrate the ranges at once
        with :func:`calibrate_activations_` on ``data`` and ``num_samples``
        posterior samples of ``guide`` (plus its median), drawn with ``seed``; ``data``
        is what :func:`calibrate_activations_` takes (a tensor, a dataset, a DataLoader).
    :param device: where calibration runs (see :func:`calibrate_activations_`). The new
        activation modules are made on the device of the network's weights.

    Only activation *modules* are replaced (functional calls such as
    ``F.relu`` inside ``forward`` are not seen); a ValueError says so when the
    network has none.

    Usage::

        qmodel = quantize_activations(model, 4, activation="relu6", guide=qguide, data=x_calib)
        Predictive(qmodel, guide=qguide, num_samples=32)(x)
    """
    if not all(hasattr(model, name) for name in _MODEL_ATTRIBUTES):
        raise TypeError(f"model must be a pyro_bq BayesianModel (e.g. BayesianClassifier), got {type(model).__name__}")
    bits = check_bits("bits", bits, allow_tensor=False)
    check_choice("range", range, ("calibrated", "natural"))
    if activation is None:
        make = None
    elif isinstance(activation, str):
        check_choice("activation", activation, tuple(_ACTIVATIONS))
        make = _ACTIVATIONS[activation]
    elif isinstance(activation, type) and issubclass(activation, nn.Module):
        make = _check_activation_class(activation)
    else:
        raise TypeError(f"activation must be None, one of {sorted(_ACTIVATIONS)} or an nn.Module class, got {activation!r}")
    net = _plain_net(model)
    where = _device_of(net)
    replaced = []
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _REPLACEABLE):
                act = make() if make is not None else child
                fq = FakeQuantActivation(act, bits, range=range, max_calls=max_calls).to(where)
                setattr(module, child_name, fq)
                replaced.append(fq)
    if not replaced:
        raise ValueError(f"{type(net).__name__} has no activation modules to quantize (functional activations "
                         "such as F.relu cannot be replaced); build the network with activation modules")
    net.register_forward_pre_hook(_ResetCalls(replaced))
    sites = {s[len("net."):] for s in model.weight_sites}
    kwargs = {}
    if hasattr(model, "learned_noise"):
        kwargs["noise"] = "learned" if model.learned_noise else float(model.noise)
    new = type(model)(net, model.prior, model.dataset_size, expose=sites, **kwargs)
    if hasattr(model, "learned_noise") and model.learned_noise:
        new.load_state_dict({k: v for k, v in model.state_dict().items() if k == "noise_unconstrained"}, strict=False)
    if guide is not None and data is not None:
        calibrate_activations_(new, guide, data, num_samples=num_samples, seed=seed, device=device)
    elif range == "calibrated" and (guide is not None or data is not None):
        raise ValueError("pass both guide and data to calibrate, or neither (then call calibrate_activations_ later)")
    return new


def _fake_quant_modules(model):
    return [m for m in model.net.modules() if isinstance(m, FakeQuantActivation)]


def check_calibrated(model) -> None:
    """Raise :class:`UncalibratedActivationError` if a fake-quant activation of ``model`` was never calibrated.

    A calibrated activation whose uses have no range yet would output zeros.
    Uses that a forward pass never reached (beyond ``max_calls``' needs) are
    not counted: a module is uncalibrated when *none* of its uses has a range.

    Usage::

        check_calibrated(qmodel)   # before evaluating
    """
    net = getattr(model, "net", model)
    if not isinstance(net, nn.Module):
        raise TypeError(f"model must be a BayesianModel or an nn.Module, got {type(model).__name__}")
    bad = [name for name, m in net.named_modules() if isinstance(m, FakeQuantActivation) and not bool(m.ready.any())]
    if bad:
        raise UncalibratedActivationError(f"the fake-quant activations {bad} have no calibrated range; {_CALIBRATE_HINT}")


def _device_of(module: nn.Module, default: str = "cpu") -> torch.device:
    """Where the first parameter or buffer of ``module`` is (``default`` when it has none)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device(default) if first is None else first.device


def _calibration_inputs(data):
    """The input tensors of ``data``, one per batch: a tensor, a dataset's ``.x``, or the ``x`` of each
    ``(x, y)`` batch (or bare input batch) of an iterable such as a DataLoader; read once."""
    if isinstance(data, torch.Tensor):
        yield data
        return
    if isinstance(getattr(data, "x", None), torch.Tensor):
        yield data.x
        return
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a tensor of inputs, a dataset with .x, or a DataLoader / iterable of (x, y) "
                        f"batches, got {type(data).__name__}")
    for index, item in enumerate(data):
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"data: batch {index} holds {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}"
                            " inputs; each batch must be a floating-point tensor x or an (x, y) pair")
        yield x


@torch.no_grad()
def calibrate_activations_(model, guide, data, *, num_samples: int = 8, seed: int = 0, device=None) -> None:
    """Set the ranges of ``model``'s fake-quant activations in place (``calibrated`` ones only).

    The range of each activation call covers its values on ``data`` under the
    guide's median and ``num_samples`` posterior samples. The samples come from
    a generator seeded with ``seed`` (the global RNG is left as it was), so the
    ranges are the same on every call.

    :param data: inputs: a tensor, a dataset with an ``.x`` tensor, or any iterable of
        ``(x, y)`` batches (a DataLoader, a list), read once: each batch runs under every draw.
    :param device: where the passes run (``"auto"``, ``"cpu"``, ``"cuda"``); default where the
        model's network is. The guide's draws and each batch are moved there.

    Usage::

        calibrate_activations_(qmodel, guide, x_train[:512], num_samples=8, seed=0)
        calibrate_activations_(qmodel, guide, DataLoader(calib_set, batch_size=256), device="cuda")
    """
    num_samples = check_int("num_samples", num_samples, low=0)
    seed = check_int("seed", seed, low=0)
    mods = _fake_quant_modules(model)
    if not mods:
        raise ValueError("model has no FakeQuantActivation modules; make it with quantize_activations first")
    device = _device_of(model.net) if device is None else resolve_device(device)
    median = guide.median()
    draws = [median]
    if num_samples:
        guide_device = next(iter(median.values())).device if median else torch.device("cpu")
        with torch.random.fork_rng(devices=[guide_device] if guide_device.type == "cuda" else []):
            torch.manual_seed(seed)
            samples = guide.sample_latents(num_samples)
        draws += [{k: v[i] for k, v in samples.items()} for i in range(num_samples)]
    draws = [{k: v.to(device) for k, v in weights.items()} for weights in draws]
    for m in mods:
        m._stats = {}
    try:
        for x in _calibration_inputs(data):  # one pass over the data; a handful of draws per batch
            x = x.to(device)
            for weights in draws:
                poutine.condition(model, data=weights)(x)
    finally:
        stats = [m._stats for m in mods]
        for m in mods:
            m._stats = None
    for m, st in zip(mods, stats):
        if m.range != "calibrated":
            continue
        for k, (lo, hi) in st.items():
            m.lo[k] = min(lo, 0.0)
            m.hi[k] = max(hi, 0.0)
            m.ready[k] = True
