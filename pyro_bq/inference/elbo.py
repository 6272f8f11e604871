"""A mean-field ELBO that evaluates only the log-densities its loss uses.

Stock :class:`~pyro.infer.TraceMeanField_ELBO` builds its traces with
``get_importance_trace``, which evaluates ``log p(w)`` at every prior site of
the model and ``log q(w)`` at every guide site, and then, for each weight site
with a closed-form KL, uses ``KL(q || p)`` instead and never reads them. On a
Bayesian network these are full passes over every weight, every step.
:class:`MeanFieldELBO` is the same estimator (same loss, same gradients, same
checks) that skips those unused evaluations for the site pairs whose KL it
knows to be analytic: a pyro_bq Normal guide site against a pyro_bq constant
Normal prior (``IIDNormal``, ``LayerwiseNormal``, ``PretrainedNormal`` scalar
priors), possibly wrapped in ``Independent`` with the same event dims. Every
other site is evaluated exactly as the stock ELBO does.

Usage::

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), MeanFieldELBO())
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch.distributions as tdist
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.distributions.score_parts import ScoreParts
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

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
    from pyro_bq.priors import _ConstNormal, _kl_normal_const

    q, q_dims = _unwrap(guide_fn)
    p, p_dims = _unwrap(model_fn)
    return (
        type(p) is _ConstNormal
        and q_dims == p_dims
        and q.batch_shape == p.batch_shape
        and tdist.kl._dispatch_kl(type(q), type(p)) is _kl_normal_const
    )


class _Shape:
    """Stands in for an unevaluated log-density in Pyro's site-shape check."""

    def __init__(self, shape):
        self.shape = shape


def _subtrace(trace: Trace, names) -> Trace:
    """A trace over some of ``trace``'s sites (the same site dicts: computed values land in ``trace``)."""
    sub = Trace(graph_type=trace.graph_type)
    for name in names:
        sub.nodes[name] = trace.nodes[name]
    return sub


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
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for name, site in trace.nodes.items():
                    if site["type"] == "sample":
                        if name in skip:  # the shape its log-density would have
                            site = {**site, "log_prob": _Shape(site["fn"].batch_shape)}
                        check_site_shape(site, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
            _check_mean_field_requirement(model_trace, guide_trace)
        return model_trace, guide_trace
