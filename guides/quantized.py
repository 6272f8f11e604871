"""The quantized guide: a float guide seen through per-site quantizers, and :func:`quantize`.

:func:`quantize` (a trained guide plus a :class:`~pyro_bq.quant.policies.Policy`)
returns a :class:`QuantizedGuide`. It wraps a *copy* of a trained :class:`AutoGaussianSites`
guide (the original is never modified) and a calibrated
:class:`~pyro_bq.quant.policies.SiteQuantizers` per site:

* :meth:`QuantizedGuide.get_loc_scale` passes the wrapped guide's ``loc`` and
  ``scale`` through their quantizers (VPQ, JQ);
* :meth:`QuantizedGuide.get_posterior` returns, for sites whose samples are
  quantized (SPQ, JQ), a :class:`QuantizedNormal`: a ``Normal`` whose
  ``rsample`` puts each draw on the sample quantizer's grid.

Every quantizer uses a straight-through estimator, so the guide trains with
stock SVI (quantization-aware fine-tuning of the wrapped guide's float
parameters). Because :class:`QuantizedNormal` *is a* ``Normal``,
``TraceMeanField_ELBO`` finds the closed-form Normal-Normal KL by the class
hierarchy: the KL term is that of the underlying Gaussian. ``Trace_ELBO``
scores a quantized draw with the Gaussian density. Both are therefore
Gaussian surrogates for the discrete distribution of the quantized weights --
the usual straight-through approximation, exact in the limit of fine grids.

**Collapsed draws.** A sample grid much coarser than a weight's ``scale``
puts almost every draw of that weight on the level nearest its ``loc``: the
weight is effectively deterministic, and where a whole site (or guide) is, all
weight draws agree, the mutual information is about 0 and the epistemic
signal is gone (e.g. JQ at 2 bits). :func:`varying_fraction` measures the
fraction of weights whose draws still differ; :func:`quantize` warns with
:class:`DeterministicDrawsWarning` when a site, or the guide as a whole, has
fewer than :data:`DETERMINISTIC_THRESHOLD` (1%) of its weights varying over
:data:`VARYING_DRAWS` (16) seeded draws (of at most :data:`VARYING_SUBSAMPLE`
weights of each site, a seeded subsample of a larger one, so that the check
costs the same at any model size).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Mapping, Optional

import pyro.distributions as dist
import torch
from pyro.nn.module import PyroModule, _Context
from torch import nn
from torch.distributions.utils import _standard_normal

from pyro_bq.quant.grids import MATCHED_ROUNDINGS
from pyro_bq.quant.policies import Policy, SiteQuantizers
from pyro_bq.quant.quantizers import Log2Quantizer, channel_range_shape

from .base import AutoGaussianSites

__all__ = ["QuantizedGuide", "QuantizedNormal", "PackedNormalBase", "copy_guide", "quantize", "calibrate_site",
           "varying_fraction", "deterministic_sites", "DeterministicDrawsWarning", "DETERMINISTIC_THRESHOLD",
           "VARYING_DRAWS", "VARYING_SUBSAMPLE"]

#: A site (or a guide) whose fraction of varying weights is below this is effectively deterministic.
DETERMINISTIC_THRESHOLD = 0.01
#: Draws per weight that :func:`varying_fraction` compares by default (and :func:`quantize` uses).
VARYING_DRAWS = 16
#: Weights per site at most that the warning of :func:`quantize` draws (a seeded subsample above it).
VARYING_SUBSAMPLE = 1 << 16
#: Draw elements (draws x weights) one vectorized block of :func:`varying_fraction` holds.
_VARYING_BLOCK = 1 << 24


class DeterministicDrawsWarning(UserWarning):
    """:func:`quantize` made a guide with a site (or as a whole) whose quantized draws barely vary.

    Usage::

        warnings.simplefilter("error", DeterministicDrawsWarning)   # refuse collapsed guides
    """


def copy_guide(guide: AutoGaussianSites) -> AutoGaussianSites:
    """A copy of a Pyro AutoGuide whose parameters are its own, leaving the original usable.

    The parameters and buffers are deep-copied. The record of the model's
    first run (``prototype_trace`` and its plate frames) is read-only state
    and is shared, not copied: it holds the model's intermediate values, which
    are not graph leaves (they cannot be deep-copied) wherever the network has
    parameters that carry no prior, such as BatchNorm's. (``AutoGuide.__getstate__``
    drops the model reference of the object being copied; this restores it on both.)

    Usage::

        twin = copy_guide(guide)   # train twin; guide is unchanged
    """
    model, master = guide._model, guide.master
    shared = (guide.prototype_trace, guide._prototype_frames)
    memo = {id(obj): obj for obj in shared if obj is not None}
    try:
        new = copy.deepcopy(guide, memo)
    finally:
        guide._model, guide.master = model, master
    new._model = model
    new.master = None
    return new


class QuantizedNormal(dist.Normal):
    """``Normal(loc, scale)`` whose draws are put on ``quantizer``'s grid (straight-through).

    ``log_prob`` and the KL divergence are those of the Gaussian. The quantizer's rounding rule
    decides how a draw reaches the grid; a variance-matched stochastic rounding draws the
    Gaussian noise with the smaller :meth:`~pyro_bq.quant.Quantizer.noise_scale`, and the
    weights of :meth:`~pyro_bq.quant.Quantizer.stochastic_mask` are the ones it rounds stochastically.
    ``rule``: the quantizer's :meth:`~pyro_bq.quant.Quantizer.draw_rule` for ``(loc, scale)`` when the
    caller has it already (:class:`QuantizedGuide` keeps it between draws); ``None``: computed per draw.

    Usage::

        d = QuantizedNormal(loc, scale, UniformQuantizer(4).calibrate(loc))
        w = d.rsample((8,))        # on the grid
    """

    def __init__(self, loc, scale, quantizer, validate_args=None, *, rule=None):
        self.quantizer = quantizer
        self.rule = rule
        super().__init__(loc, scale, validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()):
        ratio, stochastic = self.quantizer.draw_rule(self.loc, self.scale) if self.rule is None else self.rule
        if ratio is None and stochastic is None:
            return self.quantizer(super().rsample(sample_shape))
        scale = self.scale if ratio is None else self.scale * ratio
        eps = _standard_normal(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        return self.quantizer(self.loc + eps * scale, stochastic=stochastic)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(QuantizedNormal, _instance)
        new.quantizer = self.quantizer
        new.rule = self.rule  # per weight: it broadcasts against the new batch dimensions
        return super().expand(batch_shape, _instance=new)


class PackedNormalBase(AutoGaussianSites):
    """A Gaussian guide that holds ``loc`` and ``scale`` values verbatim (what :func:`load_packed` builds).

    Both are flat ``nn.Parameter``s in site order; ``scale`` is used through ``abs``.

    Usage::

        base = PackedNormalBase(model, {"net.fc.weight": (loc, scale), ...}).setup(x)
    """

    def __init__(self, model, values: Mapping[str, tuple], *, create_plates=None):
        super().__init__(model, create_plates=create_plates)
        self._values = dict(values)

    def _setup_params(self, trace) -> None:
        locs, scales = [], []
        for name, info in self.sites.items():
            if name not in self._values:
                raise ValueError(f"no stored values for site {name!r}; stored sites: {list(self._values)}")
            loc, scale = self._values[name]
            if tuple(loc.shape) != tuple(info.shape) or tuple(scale.shape) != tuple(info.shape):
                raise ValueError(f"stored values for site {name!r} have shape {tuple(loc.shape)}, "
                                 f"the model's site has shape {tuple(info.shape)}")
            locs.append(loc.reshape(-1))
            scales.append(scale.reshape(-1))
        extra = set(self._values) - set(self.sites)
        if extra:
            raise ValueError(f"stored sites {sorted(extra)} are not in the model; its sites are {list(self.sites)}")
        self.loc = nn.Parameter(torch.cat(locs).clone())
        self.scale = nn.Parameter(torch.cat(scales).clone())
        self._values = {}

    def get_loc_scale(self, name):
        info = self._check_site(name)
        sl = slice(info.offset, info.offset + info.numel)
        return self.loc[sl].view(info.shape), self.scale[sl].abs().view(info.shape)


class QuantizedGuide(AutoGaussianSites):
    """A guide whose ``loc``/``scale``/samples are quantized per site; made by :func:`quantize`.

    :param guide: a set-up :class:`AutoGaussianSites` guide (it is copied
        unless ``copy=False``).
    :param quantizers: ``{site: SiteQuantizers}`` of *calibrated* quantizers;
        sites not listed stay float.
    :param policy: the policy that made it (kept for :meth:`recalibrate_`).

    The wrapped float guide is ``self.base``; its parameters are what SVI
    fine-tunes (quantization-aware training through the straight-through
    estimator). ``median()`` and ``quantiles()`` are those of the quantized
    distribution (quantization is monotone, so quantiles map through it).

    Usage::

        qguide = quantize(guide, JQ(4))
        Predictive(model, guide=qguide, num_samples=32)(x)
        svi = SVI(model, qguide, pyro.optim.Adam({"lr": 1e-4}), TraceMeanField_ELBO())  # fine-tune
    """

    def __init__(self, guide: AutoGaussianSites, quantizers: Mapping[str, object], *, policy=None,
                 copy: bool = True):
        if not isinstance(guide, AutoGaussianSites):
            raise TypeError(f"guide must be a pyro_bq AutoGaussianSites guide (e.g. AutoMeanFieldNormal), "
                            f"got {type(guide).__name__}")
        if guide.prototype_trace is None:
            raise ValueError("guide has no parameters yet: call it once with example inputs, or guide.setup(x), first")
        if guide.model is None:
            raise ValueError("guide has lost its model reference (was it deep-copied? use copy_guide)")
        super().__init__(guide.model, create_plates=guide.create_plates)
        base = copy_guide(guide) if copy else guide
        if copy:  # the copy's PyroModule children join this guide's context (Pyro refuses used ones)
            for _, module in base.named_modules():
                if module is not base and isinstance(module, PyroModule):
                    module._pyro_context = _Context()
        self.base = base
        base.master = None  # the wrapped guide is only asked for loc and scale
        self.prototype_trace = guide.prototype_trace
        self._prototype_frames = dict(guide._prototype_frames)
        self.sites = dict(guide.sites)
        unknown = set(quantizers) - set(self.sites)
        if unknown:
            raise ValueError(f"quantizers given for unknown sites {sorted(unknown)}; sites are {list(self.sites)}")
        self.quantizers = dict(quantizers)
        self.policy = policy
        self._draw_rules = {}  # {site: (quantizers, (loc, scale), draw rule)}: see _draw_rule
        #: False: always draw site by site. Starts as the wrapped guide draws (so a float
        #: policy draws exactly what its guide draws under the same seed); load_packed
        #: sets it to match the saved guide.
        with torch.no_grad():
            self.fused = base.fused_loc_scale() is not None

    def _site_quantizers(self, name):
        return self.quantizers.get(name)

    # -- the extension points -----------------------------------------------------
    def get_loc_scale(self, name):
        loc, scale = self.base.get_loc_scale(name)
        sq = self._site_quantizers(name)
        if sq is not None:
            if sq.loc is not None:
                loc = sq.loc(loc)
            if sq.scale is not None:
                scale = sq.scale(scale)
        return loc, scale

    def get_posterior(self, name):
        sq = self._site_quantizers(name)
        if sq is None or sq.sample is None:
            return super().get_posterior(name)
        loc, scale = self.get_loc_scale(name)
        rule = self._draw_rule(name, sq, loc, scale)
        draws = QuantizedNormal(loc, scale, sq.sample, validate_args=False, rule=rule)
        return draws.to_event(self.sites[name].event_dim)

    def _draw_rule(self, name, sq, loc, scale):
        """``sq.sample.draw_rule(loc, scale)``, computed again only when the site's quantizers (by
        identity: quantizers are not changed in place, ``calibrate`` and ``with_rounding`` return copies)
        or its quantized ``loc`` and ``scale`` (by value) have changed. The variance-matched rules solve
        for their noise per weight, which costs more than a draw; SVI steps change the parameters,
        predictions do not."""
        if sq.sample.rounding not in MATCHED_ROUNDINGS:
            return None
        loc, scale = loc.detach(), scale.detach()
        hit = self._draw_rules.get(name)
        if not (hit is not None and all(a is b for a, b in zip(hit[0], (sq.loc, sq.scale, sq.sample)))
                and all(_same(a, b) for a, b in zip(hit[1], (loc, scale)))):
            hit = ((sq.loc, sq.scale, sq.sample), (loc.clone(), scale.clone()), sq.sample.draw_rule(loc, scale))
            self._draw_rules[name] = hit
        return hit[2]

    def fused_loc_scale(self):
        # Sites that sample a plain Normal (float and VPQ sites) can share the
        # base class's one-draw path: then a FloatPolicy guide draws exactly
        # what its float guide draws under the same seed, and VPQ differs from
        # float only by the quantization of loc and scale.
        if not self.fused or any(sq.sample is not None for sq in self.quantizers.values()):
            return None
        locs, scales = zip(*(self.get_loc_scale(name) for name in self.sites))
        return torch.cat([t.reshape(-1) for t in locs]), torch.cat([t.reshape(-1) for t in scales])

    # -- summaries of the quantized distribution -------------------------------------
    @torch.no_grad()
    def median(self, *args, **kwargs):
        out = {}
        for name in self.sites:
            loc = self.get_loc_scale(name)[0].detach().clone()
            sq = self._site_quantizers(name)
            out[name] = sq.sample.quantize(loc) if sq is not None and sq.sample is not None else loc
        return out

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs):
        out = super().quantiles(quantiles, *args, **kwargs)
        for name, value in out.items():
            sq = self._site_quantizers(name)
            if sq is not None and sq.sample is not None:
                out[name] = sq.sample.quantize(value)
        return out

    # -- maintenance ------------------------------------------------------------------
    def recalibrate_(self) -> "QuantizedGuide":
        """Re-calibrate every quantizer on the current float parameters (in place; returns self).

        Useful during quantization-aware fine-tuning, e.g. as ``fit_svi(..., step_hook=qguide.recalibrate_)``.
        Needs the policy the guide was made with.
        """
        if self.policy is None:
            raise RuntimeError("recalibrate_ needs the policy this guide was made with (policy=None here)")
        self.quantizers = _calibrate_sites(self.base, self.policy)
        return self

    def float_guide(self) -> AutoGaussianSites:
        """A copy of the wrapped float guide (e.g. after fine-tuning)."""
        return copy_guide(self.base)

    def extra_repr(self) -> str:
        n = sum(1 for s in self.quantizers.values() if not s.is_float)
        return f"policy={self.policy!r}, quantized_sites={n}/{len(self.sites)}"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors: same shape, dtype, device and values."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def calibrate_site(policy: Policy, name: str, loc: torch.Tensor, scale: torch.Tensor, *,
                   native_scale=None) -> SiteQuantizers:
    """Calibrated quantizers of one site, as ``policy`` configures them.

    ``loc`` is calibrated on itself, ``scale`` on itself, and the sample
    quantizer on the envelope ``loc +- policy.calib_width * scale`` of the
    (already quantized, for JQ) posterior. ``native_scale``: a calibrated
    :class:`~pyro_bq.quant.Log2Quantizer` of a guide whose scales already live on a log2 grid
    (:class:`~pyro_bq.guides.logquant.AutoLogQuantNormal`); it is used instead
    of a new calibration when the policy asks for a log2 scale grid of the same bits.

    Usage::

        sq = calibrate_site(JQ(4), "net.fc1.weight", loc, scale)
    """
    spec = policy.configure_site(name, loc.shape)
    if not isinstance(spec, SiteQuantizers):
        raise TypeError(f"{type(policy).__name__}.configure_site must return SiteQuantizers, got {type(spec).__name__}")
    out = SiteQuantizers()
    with torch.no_grad():
        loc, scale = loc.detach(), scale.detach()
        if spec.loc is not None:
            out.loc = spec.loc.calibrate(loc)
            loc = out.loc.quantize(loc)
        if spec.scale is not None:
            if (native_scale is not None and isinstance(spec.scale, Log2Quantizer)
                    and isinstance(spec.scale.bits, int) and spec.scale.bits == native_scale.bits):
                out.scale = native_scale
            else:
                out.scale = spec.scale.calibrate(scale)
            scale = out.scale.quantize(scale)
        if spec.sample is not None:
            width = policy.calib_width * scale
            out.sample = spec.sample.calibrate(loc - width, loc + width)
    return out


def _calibrate_sites(guide: AutoGaussianSites, policy: Policy) -> dict:
    """``{site: SiteQuantizers}`` of a float guide under ``policy``."""
    with torch.no_grad():
        out = {}
        for name in guide.sites:
            loc, scale = guide.get_loc_scale(name)
            native = guide.scale_quantizer(name) if hasattr(guide, "scale_quantizer") else None
            out[name] = calibrate_site(policy, name, loc, scale, native_scale=native)
    return out


def quantize(guide: AutoGaussianSites, policy: Policy) -> QuantizedGuide:
    """Return a new :class:`QuantizedGuide`; ``guide`` is left untouched.

    The quantizers are calibrated on the device of the guide's parameters, and the new guide
    stays there (move a guide with ``guide.to(device)`` first to quantize it elsewhere).

    :param guide: a trained (set-up) :class:`AutoGaussianSites` guide. A
        :class:`QuantizedGuide` is re-quantized from its wrapped float
        parameters (e.g. after fine-tuning), not quantized twice.
    :param policy: a :class:`~pyro_bq.quant.Policy` (:class:`~pyro_bq.quant.VPQ`,
        :class:`~pyro_bq.quant.SPQ`, :class:`~pyro_bq.quant.JQ` or :class:`~pyro_bq.quant.FloatPolicy`).
    :raises TypeError: for a guide or policy of the wrong type.
    :raises ValueError: for a guide without parameters, or a policy entry
        (``site_bits`` or ``site_quantizers`` key, ``skip`` entry, bits tensor) that fits no site.
    :warns DeterministicDrawsWarning: when fewer than :data:`DETERMINISTIC_THRESHOLD` (1%) of
        the weights of a site, or of the whole guide, vary over :data:`VARYING_DRAWS` draws
        (measured with :func:`varying_fraction`, seed 0, on at most :data:`VARYING_SUBSAMPLE`
        weights of a site; the global RNG is untouched).

    Usage::

        qguide = quantize(guide, JQ(4, skip=["net.conv1.weight", "net.fc3.weight"]))
        Predictive(model, guide=qguide, num_samples=32)(x)
    """
    if not isinstance(guide, AutoGaussianSites):
        raise TypeError(f"guide must be a pyro_bq AutoGaussianSites guide (e.g. AutoMeanFieldNormal), "
                        f"got {type(guide).__name__}")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a pyro_bq Policy (VPQ, SPQ, JQ, FloatPolicy), got {type(policy).__name__}")
    if guide.prototype_trace is None:
        raise ValueError("guide has no parameters yet: train it, or call it once with example inputs, first")
    if isinstance(guide, QuantizedGuide):
        guide = guide.base
    policy.check_sites(guide.sites)
    qguide = QuantizedGuide(guide, _calibrate_sites(guide, policy), policy=policy)
    _warn_if_deterministic(qguide)
    return qguide


def _site_varying(guide: AutoGaussianSites, name: str, num_draws: int, max_per_site=None, seed: int = 0) -> float:
    """Fraction of the weights of site ``name`` whose ``num_draws`` draws are not all equal (global RNG),
    over a subsample of about ``max_per_site`` of them (:func:`_subsample_block`, seeded by ``seed``)
    when the site is larger."""
    info = guide.sites[name]
    sub = max_per_site is not None and info.numel > max_per_site
    base = _quantized_subsample(guide, name, max_per_site, seed) if sub else None
    if base is None:
        posterior = guide.get_posterior(name)
        base = getattr(posterior, "base_dist", posterior)
        if not isinstance(base, QuantizedNormal):
            # a float Normal draw differs from the next with probability 1 wherever its scale is positive
            return float((guide.get_loc_scale(name)[1].detach() > 0).double().mean())
        block = _subsample_block(base.quantizer, base.loc.shape, max_per_site, seed) if sub else None
        if block is not None:
            base = QuantizedNormal(block(base.loc), block(base.scale), base.quantizer, validate_args=False)
    varying = torch.zeros(base.loc.shape, dtype=torch.bool, device=base.loc.device)
    first = None
    block = max(2, _VARYING_BLOCK // max(1, base.loc.numel()))
    done = 0
    while done < num_draws:  # blocks of draws, each compared at once with the first draw
        take = min(block, num_draws - done)
        draws = base.sample((take,)).detach()
        if first is None:
            first = draws[0]
        varying |= (draws != first).any(0)
        done += take
    return float(varying.double().mean())


def _quantized_subsample(guide, name: str, size: int, seed: int):
    """The sample distribution of a :class:`QuantizedGuide`'s site on the subsample of
    :func:`_subsample_block`, quantizing only the subsample of the float ``loc`` and ``scale``;
    None where that does not apply (another guide, a float sample, a quantizer laid out otherwise).

    The same values as the subsample of the whole site's quantized ``loc`` and ``scale``:
    each element meets the same per-channel (or per-tensor) calibration either way.
    """
    sq = guide._site_quantizers(name) if isinstance(guide, QuantizedGuide) else None
    if sq is None or sq.sample is None:
        return None
    shape = guide.sites[name].shape
    layout = _block_layout(sq.sample, shape)
    if layout is None or any(q is not None and _block_layout(q, shape) not in (layout, _per_tensor(shape))
                             for q in (sq.loc, sq.scale)):
        return None
    block = _subsample_block(sq.sample, shape, size, seed)
    if block is None:
        return None
    loc, scale = (block(t.detach()) for t in guide.base.get_loc_scale(name))
    loc = sq.loc(loc) if sq.loc is not None else loc
    scale = sq.scale(scale) if sq.scale is not None else scale
    return QuantizedNormal(loc, scale, sq.sample, validate_args=False)


def _per_tensor(shape) -> list:
    return [1] * len(shape)


def _block_layout(q, shape):
    """The calibration shape of quantizer ``q`` on a site of ``shape`` (per tensor or per channel), or None
    where it is unknown (not a packable quantizer) or per weight (a bits tensor)."""
    if type(q).packed_type is None or isinstance(q.bits, torch.Tensor) or len(shape) == 0:
        return None
    return channel_range_shape(q.config(), list(shape))


def _subsample_block(q, shape, size: int, seed: int):
    """A function taking a tensor of the site's ``shape`` to about ``size`` of its elements, or None
    (the site is small enough, or the layout of ``q`` is unknown or per weight).

    A packable quantizer's calibration is per tensor or per channel
    (:func:`~pyro_bq.quant.quantizers.channel_range_shape`), so the subsample
    keeps every channel, with ``m`` positions drawn uniformly (independently,
    with replacement, from a generator seeded with ``seed``) within each: a
    ``[C, m]`` block with ``C * m`` about ``size``, laid out so that the
    per-channel ranges broadcast against it as against the whole site.
    """
    layout = _block_layout(q, shape)
    if layout is None:
        return None
    ndim = len(shape)
    d = next((i for i, r in enumerate(layout) if r > 1), 0)
    c = int(layout[d])
    cols = math.prod(shape) // c
    m = max(1, size // c)
    if m >= cols:
        return None
    pick = torch.randint(cols, (c, m), generator=torch.Generator().manual_seed(seed))

    def block(t):  # [C, m] with the channel dim at d and m at another dim, ones elsewhere
        rows = t.expand(shape).movedim(d, 0).reshape(c, cols).gather(1, pick.to(t.device))
        if ndim == 1:
            return rows.reshape(m)
        return rows.reshape([c, m] + [1] * (ndim - 2)).movedim((0, 1), (d, (d + 1) % ndim))

    return block


@torch.no_grad()
def varying_fraction(guide: AutoGaussianSites, num_draws: int = VARYING_DRAWS, seed: int = 0,
                     max_per_site: Optional[int] = None) -> dict:
    """``{site: fraction of its weights whose draws are not all equal}`` over ``num_draws`` draws.

    A site whose samples are quantized (SPQ, JQ) is drawn ``num_draws`` times
    (vectorized over weights and draws, from a generator seeded with ``seed``;
    the global RNG is left as it was) and a weight counts as varying when any
    draw differs from the first. A site whose samples stay float counts the
    weights with a positive scale (their draws differ with probability 1).
    A fraction near 0 means the site is effectively deterministic.

    With ``max_per_site`` a quantized site of more weights is measured on a
    seeded random subsample of about that many (every channel of a
    per-channel quantizer kept, random positions in each), so the cost no
    longer grows with the site; the fraction is then an estimate (standard
    error at most ``0.5 / sqrt(max_per_site)``). A site whose quantizer has
    per-weight bits is always measured whole. None (the default): every weight.

    :param guide: a set-up :class:`AutoGaussianSites` guide (quantized or not).
    :param num_draws: draws per weight, at least 2.
    :param seed: seed of the draws (and of the subsample).
    :param max_per_site: weights drawn per site at most (an int >= 1), or None for all.

    Usage::

        fractions = varying_fraction(quantize(guide, JQ(2)), num_draws=16, seed=0)
        min(fractions.values())      # ~0: all draws of those weights agree
    """
    if not isinstance(guide, AutoGaussianSites):
        raise TypeError(f"guide must be a pyro_bq AutoGaussianSites guide, got {type(guide).__name__}")
    if guide.prototype_trace is None:
        raise ValueError("guide has no parameters yet: train it, or call it once with example inputs, first")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an int >= 2 (draws to compare), got {num_draws!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if max_per_site is not None and (isinstance(max_per_site, bool) or not isinstance(max_per_site, int)
                                     or max_per_site < 1):
        raise ValueError(f"max_per_site must be an int >= 1 or None (every weight), got {max_per_site!r}")
    on = [t.device for t in guide.parameters() if t.device.type == "cuda"][:1]  # its CUDA RNG is put back too
    with torch.random.fork_rng(devices=on):
        torch.manual_seed(seed)
        return {name: _site_varying(guide, name, num_draws, max_per_site, seed) for name in guide.sites}


def deterministic_sites(fractions: Mapping[str, float], sizes: Mapping[str, int], *,
                        threshold: float = DETERMINISTIC_THRESHOLD) -> tuple[float, list]:
    """The overall varying fraction (weighted by site size) and the sites below ``threshold``.

    :param fractions: ``{site: varying fraction}`` (from :func:`varying_fraction`).
    :param sizes: ``{site: number of weights}``.

    Usage::

        overall, sites = deterministic_sites(varying_fraction(qguide), {n: i.numel for n, i in qguide.sites.items()})
    """
    total = sum(sizes[name] for name in fractions)
    overall = sum(fractions[name] * sizes[name] for name in fractions) / max(1, total)
    return overall, [name for name, value in fractions.items() if value < threshold]


def _warn_if_deterministic(qguide: QuantizedGuide) -> None:
    """Warn (:class:`DeterministicDrawsWarning`) when ``qguide`` or some of its sites barely vary."""
    fractions = varying_fraction(qguide, max_per_site=VARYING_SUBSAMPLE)
    overall, sites = deterministic_sites(fractions, {n: i.numel for n, i in qguide.sites.items()})
    if overall < DETERMINISTIC_THRESHOLD or sites:
        what = "the whole guide" if overall < DETERMINISTIC_THRESHOLD else f"{len(sites)} of {len(fractions)} sites"
        listed = ", ".join(f"{n}: {fractions[n]:.2%}" for n in sites)
        warnings.warn(
            f"{qguide.policy!r} leaves {what} effectively deterministic (fewer than {DETERMINISTIC_THRESHOLD:.0%} of "
            f"the weights vary over {VARYING_DRAWS} draws; overall {overall:.2%}; {listed}): the weight draws agree, "
            "so the mutual information is about 0 and carries no epistemic signal. Use more sample bits for those "
            "sites (site_bits=...) or VPQ, which keeps draws in float",
            DeterministicDrawsWarning, stacklevel=3)
