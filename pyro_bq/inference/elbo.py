"""A mean-field ELBO that evaluates only the log-densities its loss uses.

Stock :class:`~pyro.infer.TraceMeanField_ELBO` builds its traces with
``get_importance_trace``, which evaluates ``log p(w)`` at every prior site of
the model and ``log q(w)`` at every guide site, and then, for each weight site
with a closed-form KL, uses ``KL(q || p)`` instead and never reads them. On a
Bayesian network these are full passes over every weight, every step.
:class:`MeanFieldELBO` is the same estimator (same loss, same gradients, same
checks) that skips those unused evaluations for the site pairs whose KL it
knows to be analytic: a Normal guide site against a
:class:`~pyro_bq.distributions.ConstNormal` prior (``IIDNormal``, ``LayerwiseNormal``),
the pair :func:`~pyro_bq.distributions.kl_normal_const` computes, possibly wrapped
in ``Independent`` with the same event dims. Every other site is evaluated
exactly as the stock ELBO does.

When all sites of one fused guide draw (the :attr:`~pyro_bq.distributions.FusedNormal.flat`
draw of :class:`~pyro_bq.guides.AutoMeanFieldNormal`) are such pairs, with no mask and
one common scale, their KL terms are summed in one pass over the flat vectors
rather than site by site: the same number up to float rounding (the terms are
added in another order) and the same gradients, without per-site views whose
gradients would have to be concatenated again.

Usage::

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), MeanFieldELBO())
"""

from __future__ import annotations

from functools import cached_property
from types import SimpleNamespace
from typing import NamedTuple

import pyro.poutine as poutine
import torch
import torch.distributions as tdist
from pyro.distributions.score_parts import ScoreParts
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

from pyro_bq.distributions import ConstNormal, FusedNormal, KLNormalConstSum, flat_prior_constants, kl_normal_const

__all__ = ["MeanFieldELBO"]


def _unwrap(fn):
    """``(base distribution, reinterpreted dims)`` through ``Independent`` wrappers."""
    dims = 0
    while isinstance(fn, tdist.Independent):
        dims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, dims


def _analytic_pair(guide_fn, model_fn) -> bool:
    """True for the pairs whose KL the loss computes with pyro_bq's closed form, which cannot fail
    (so their log-densities go unused)."""
    q, q_dims = _unwrap(guide_fn)
    p, p_dims = _unwrap(model_fn)
    return (type(p) is ConstNormal and q_dims == p_dims and q.batch_shape == p.batch_shape
            and _kl_function(type(q), type(p)) is kl_normal_const)


def _kl_function(type_q, type_p):
    """The function ``kl_divergence`` dispatches to for these types, memoized in torch's own
    table as ``kl_divergence`` does (``register_kl`` clears it)."""
    memo = tdist.kl._KL_MEMOIZE
    fun = memo.get((type_q, type_p))
    if fun is None:
        fun = memo[type_q, type_p] = tdist.kl._dispatch_kl(type_q, type_p)
    return fun


def _subtrace(trace: Trace, names) -> Trace:
    """A trace over some of ``trace``'s sites (the same site dicts: computed values land in ``trace``)."""
    sub = Trace(graph_type=trace.graph_type)
    for name in names:
        sub.nodes[name] = trace.nodes[name]
    return sub


class _FlatKL(NamedTuple):
    """The KL of all sites of one flat guide draw, summed in one pass."""

    names: tuple
    loc: torch.Tensor
    scale: torch.Tensor
    loc0: object  # number or vector
    c: object  # 1 / scale0**2: number or vector
    const: float
    site_scale: float


def _flat_groups(guide_trace: Trace, model_trace: Trace, names, cache: dict) -> list:
    """The analytic sites among ``names`` that tile one fused guide draw each, as :class:`_FlatKL`.

    A draw qualifies when every one of its sites is among ``names``, none has a
    mask, and all have the same numeric scale; other sites keep the per-site KL.
    """
    draws: dict = {}
    for name in names:
        site = guide_trace.nodes[name]
        q, _ = _unwrap(site["fn"])
        flat = q.flat if isinstance(q, FusedNormal) else None
        if flat is None or site["mask"] is not None or not isinstance(site["scale"], (int, float)):
            continue
        draws.setdefault(id(flat), (flat, []))[1].append((q.offset, q.loc.numel(), name, site["scale"]))
    groups = []
    for flat, segments in draws.values():
        segments.sort()
        end, ok = 0, True
        for offset, numel, _, scale in segments:
            ok = ok and offset == end and scale == segments[0][3]
            end = offset + numel
        if not ok or end != flat.loc.numel() or flat.loc.dim() != 1:
            continue  # not the whole draw: site by site
        priors = [_unwrap(model_trace.nodes[name]["fn"])[0] for _, _, name, _ in segments]
        key = (tuple((n, p.loc0, p.scale0) for (_, n, _, _), p in zip(segments, priors)), flat.loc.dtype,
               flat.loc.device)
        constants = cache.get(key)
        if constants is None:
            if len(cache) > 16:
                cache.clear()
            constants = cache[key] = flat_prior_constants(
                [p.loc0 for p in priors], [p.scale0 for p in priors], [s[1] for s in segments], flat.loc)
        groups.append(_FlatKL(tuple(s[2] for s in segments), flat.loc, flat.scale, *constants,
                              float(segments[0][3])))
    return groups


class MeanFieldELBO(TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` without the log-densities its loss never reads.

    Same estimator, same arguments (``num_particles``, ``max_plate_nesting``,
    ...), same validation; see the module docstring for which sites are skipped.
    """

    def _get_trace(self, model, guide, args, kwargs):
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            return super()._get_trace(model, guide, args, kwargs)  # GuideMessenger: the stock path
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(
            *args, **kwargs
        )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        skip = {
            name
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and name in guide_trace.nodes
            and _analytic_pair(guide_trace.nodes[name]["fn"], site["fn"])
        }
        model_trace.compute_log_prob(site_filter=lambda name, site: name not in skip)
        _subtrace(guide_trace, [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and n not in skip]
                  ).compute_score_parts()
        for name in skip:  # reparameterized draws: no score-function term; the KL replaces the densities
            guide_trace.nodes[name]["score_parts"] = ScoreParts(log_prob=None, score_function=0, entropy_term=None)
        guide_trace.bq_flat_kl = _flat_groups(guide_trace, model_trace, skip, self._flat_constants)
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for name, site in trace.nodes.items():
                    if site["type"] == "sample":
                        if name in skip:  # the shape its log-density would have
                            site = {**site, "log_prob": SimpleNamespace(shape=site["fn"].batch_shape)}
                        check_site_shape(site, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
            _check_mean_field_requirement(model_trace, guide_trace)
        return model_trace, guide_trace

    @cached_property
    def _flat_constants(self) -> dict:
        """Per-instance cache of the prior constants of each flat KL (they change only with the priors)."""
        return {}

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        groups = getattr(guide_trace, "bq_flat_kl", None)
        if not groups:
            return super()._differentiable_loss_particle(model_trace, guide_trace)
        flat_names = {name for group in groups for name in group.names}
        loss, surrogate = super()._differentiable_loss_particle(
            _subtrace(model_trace, [n for n in model_trace.nodes if n not in flat_names]),
            _subtrace(guide_trace, [n for n in guide_trace.nodes if n not in flat_names]),
        )
        kl = 0.0
        for g in groups:
            term = KLNormalConstSum.apply(g.loc, g.scale, g.loc0, g.c, g.const)
            kl = kl + (term if g.site_scale == 1.0 else term * g.site_scale)
        kl_value = kl.detach() if torch._C._get_tracing_state() else torch_item(kl)
        return loss + kl_value, surrogate + kl
