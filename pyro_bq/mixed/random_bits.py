"""Random Bits: per-layer widths as softmax-distributed random variables.

Site ``j`` has logits ``phi_j`` over the candidate widths; ``P[b_j = i] =
softmax(phi_j)_i`` (Eq. 4). The coefficient ``tau_{j,i}`` is the
informativeness-weighted squared error, in units of sigma, of quantizing the
site's means uniformly on ``[alpha_j, beta_j]`` with width ``i`` (Eq. 7; the
grid of :func:`~pyro_bq.quant.grids.interval_grid`), with
weights ``c_j(w) = info(w) / sum info`` over the site. Adam minimises

    L(phi) = sum_j sum_i tau_{j,i} P[b_j = i] + eta * (gamma - E[b_mean])^2     (Eq. 9)

where ``E[b_mean]`` is the size-weighted mean of ``E[b_j]`` (Eq. 8). Whenever
the rounded widths ``round(E[b_j])`` give a mean below ``gamma`` the interval
boundaries take ``boundary_steps`` (``K``) steps along the approximate
gradients of Eq. 12-13, ``dT/dbeta_j = 2 / (beta_j - alpha_j) * sum_w c_j(w)
(Q(mu_w) - mu_w)^2 / sigma_w^2`` and ``dT/dalpha_j = -dT/dbeta_j``; a step that
does not lower the exact ``T`` is undone and that site's step size halved.
The result is ``b_hat_j = round(E[b_j])``, snapped to the nearest candidate.

All sites are handled at once: the means of every site live in one flat
vector, site after site, and ``tau`` is one vectorized pass plus one
segmented sum per update.

Readings of the paper:

* Support: the paper lets every ``b_j`` range over 1..32; the default
  candidates here are 2..8 (``candidate_bits``; any subset of 1..16, the
  widths a packed file stores: a wider or non-integer width is refused
  when the allocation starts, by :func:`~pyro_bq.quant.grids.check_bits`).
* A layer is a Pyro site by default; ``layers="module"`` makes a module's
  weight and bias one layer (one width and one interval), the paper's
  ``l_j``. Site sizes are exact integers (a float32 count would turn
  ``2**24 + 1`` weights into ``2**24``).
* Rounding: the paper takes ``round(E[b_j])``, which can leave the mean
  above ``gamma``; ``rounding="at_most"`` then moves sites to their lower
  neighbouring candidate until the mean is within the bound
  (``"budget"``: nearest to ``gamma`` either way).
* RB reads only the posterior (``training="data-free"``).
* Appendix B: "1000 epochs" are 1000 steps (the loss involves no data, so an
  epoch is one step) and the regularisation parameter 3e3 is ``eta``.
  ``tau`` is divided by its largest entry so that ``eta`` means the same
  whatever the network's sigma scale.
* Two changes make the toy and LeNet-5 problems converge in those 1000
  steps: Adam's learning rate is 5e-2 (paper: 1e-2) and ``eta`` grows
  geometrically from ``eta / 1000`` over the first 80% of the steps (with
  the full ``eta`` from the start, the stiff penalty keeps every site at
  nearly the same expected width).
* Appendix B also lists "Delta: 0.2", a symbol the paper never defines (the
  ``Delta b`` of the complexity appendix is ``b_max - b_min``, not a number
  one sets). Nothing here uses it: it might be a step or a tolerance, but we
  do not guess which.
* The interval starts at the min/max of the site's means (the paper does
  not say where it starts): with the 5th-95th percentile interval of QIU the
  clipping error dominates ``tau`` and hardly falls with the width
  (``init_interval="percentile"`` keeps that option).
* Boundary updates: the paper updates the boundaries whenever the rounded
  mean is below ``gamma``; we check every ``boundary_every`` steps, scale
  the step of Eq. 13 to the interval width, and undo a step that does not
  lower ``T`` (halving that site's step size).

Usage::

    alloc = random_bits(guide, 3.2, candidate_bits=range(2, 9))
    alloc.info["loss"][-1], alloc.mean_bits
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from pyro_bq._validation import check_choice, check_float, check_int, check_positive
from pyro_bq.quant.grids import interval_grid, minmax_range, percentile_range, uniform_quantize, widen_empty
from pyro_bq.quant.quantizers import IntervalQuantizer

from .informativeness import (
    BitAllocation,
    check_candidate_bits,
    check_target,
    decode_metadata_bits,
    grouped_params,
    layer_groups,
    site_sizes,
    validated,
)

__all__ = ["random_bits", "RandomBitsProblem"]


class RandomBitsProblem:
    """The flattened data of a Random Bits run (internal; exposed for tests).

    :param params: validated ``{site: (loc, scale)}``.
    :param candidates: sorted candidate widths.
    """

    def __init__(self, params, candidates: list[int], interval: str = "minmax"):
        self.names = list(params)
        sizes = site_sizes(params)
        # the optimization runs on the CPU whatever device the posterior is on, so the allocation is the same
        params = {n: (params[n][0].detach().cpu(), params[n][1].detach().cpu()) for n in self.names}
        #: exact weights per site (ints; float64 holds every count below 2**53 exactly)
        self.sizes = [sizes[n] for n in self.names]
        self.size = torch.tensor(self.sizes, dtype=torch.float64)
        self.mu = torch.cat([params[n][0].flatten() for n in self.names]).float()
        sigma = torch.cat([params[n][1].flatten() for n in self.names]).float()
        self.site = torch.repeat_interleave(
            torch.arange(len(self.names)), torch.tensor([sizes[n] for n in self.names])
        )
        self.starts = np.concatenate([[0], np.cumsum([sizes[n] for n in self.names])[:-1]]).astype(np.int64)
        info = self.mu.abs() / sigma
        denom = torch.zeros(len(self.names), dtype=torch.float64).index_add_(0, self.site, info.double()).float()
        # a site whose means are all zero: weight its weights equally
        counts = self.size
        c = torch.where(denom[self.site] > 0, info / denom[self.site].clamp_min(1e-30), (1.0 / counts[self.site]).float())
        self.weight = c / sigma.pow(2)  # c_j(w) / sigma_w^2
        self.cand = torch.tensor(candidates, dtype=torch.float32)

        def interval_of(loc):
            flat = loc.reshape(1, -1).double()
            return percentile_range(flat, 5.0, 95.0) if interval == "percentile" else minmax_range(flat)

        lo, hi = (torch.cat(v) for v in zip(*(interval_of(params[n][0]) for n in self.names)))
        self.alpha, self.beta = (t.float() for t in widen_empty(lo, hi))

    def _segment_sum(self, err: torch.Tensor) -> torch.Tensor:
        # weights are stored site after site, so a per-site sum is one reduceat
        out = np.add.reduceat(err.numpy(), self.starts, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(out))

    def _errors(self, alpha, beta, bits) -> torch.Tensor:
        """``c_j(w) (Q(mu_w) - mu_w)^2 / sigma_w^2`` per weight, ``bits`` broadcasting against the weights."""
        err = uniform_quantize(self.mu, *interval_grid(alpha[self.site], beta[self.site], bits)) - self.mu
        return self.weight * err.pow(2)

    def site_errors(self, alpha, beta, bits) -> torch.Tensor:
        """``sum_w c_j(w) (Q(mu_w) - mu_w)^2 / sigma_w^2`` per site for one width per site:
        ``bits`` has shape ``(N,)``; returns ``(N,)``."""
        return self._segment_sum(self._errors(alpha, beta, bits[self.site]))

    def tau(self, alpha, beta) -> torch.Tensor:
        """``tau_{j,i}`` (Eq. 7) for every site and candidate: shape ``(N, K)``."""
        return self._segment_sum(self._errors(alpha, beta, self.cand.reshape(-1, 1))).t().contiguous()


def _round_to_candidates(expected: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    rounded = torch.round(expected)
    idx = torch.argmin((rounded.reshape(-1, 1) - cand.reshape(1, -1)).abs(), dim=1)
    return idx


def random_bits(
    posterior,
    target_mean_bits: float,
    *,
    candidate_bits: Iterable[int] = range(2, 9),
    num_steps: int = 1000,
    lr: float = 5e-2,
    penalty: float = 3e3,
    boundary_steps: int = 1,
    boundary_lr: float = 1e-2,
    boundary_every: int = 25,
    penalty_warmup: float = 0.8,
    rounding: str = "nearest",
    init_interval: str = "minmax",
    layers: str = "site",
    seed: int = 0,
    sites=None,
) -> BitAllocation:
    """Run Random Bits and return the rounded per-site widths.

    :param posterior: a trained pyro_bq guide or ``{site: (loc, scale)}``, on any device (the
        optimization runs on the CPU, so the allocation does not depend on the device).
    :param target_mean_bits: ``gamma``, within the candidate range.
    :param candidate_bits: allowed widths (the support of each ``b_j``).
    :param num_steps: Adam steps on the logits ``phi``.
    :param lr: Adam learning rate.
    :param penalty: ``eta``, weight of ``(gamma - E[b_mean])^2``.
    :param boundary_steps: ``K``, boundary updates each time they are due.
    :param boundary_lr: step size of the boundary updates, relative to the
        interval width (the approximate gradient of Eq. 13 is used as given,
        times ``boundary_lr * (beta - alpha)^2 / 2`` so steps are scale free).
    :param boundary_every: check the boundaries every this many steps (they
        change ``tau``, whose recomputation costs one pass over all weights).
    :param rounding: ``"nearest"`` (``round(E[b_j])``, the paper's rule),
        ``"budget"`` (then sites move to a neighbouring candidate of ``E[b_j]``
        while that brings the mean nearer ``gamma``) or ``"at_most"`` (as
        ``"budget"``, but the mean never ends above ``gamma``, the paper's
        bound: sites are lowered one width at a time, the smallest step that
        meets the bound first, then raised while the mean stays within it).
    :param init_interval: where each interval starts: ``"minmax"`` (the means'
        range, no clipping) or ``"percentile"`` (their 5th to 95th percentile).
    :param layers: ``"site"`` (every Pyro site is a layer) or ``"module"`` (a
        module's weight and bias form one layer: one width and one interval);
        the result is keyed by site name either way.
    :returns: a :class:`BitAllocation` whose ``info`` holds ``loss`` (Eq. 9 with
        the final ``eta``, before each step, then at the end), ``optimized_loss``
        (with the growing ``eta`` actually optimized),
        ``expected_mean_bits``, and per site ``expected_bits``, ``probs``, ``alpha``, ``beta``.
    :raises ValueError: for candidate widths that are not ints from 1 to 16
        (e.g. 3.7 or 20), a target outside their range, or a bad option.

    Usage::

        alloc = random_bits(guide, 3.2, layers="module")
        alloc.code_bits, alloc.storage_bits
    """
    candidates = check_candidate_bits(candidate_bits)
    gamma = check_target(target_mean_bits, candidates)
    num_steps = check_int("num_steps", num_steps, low=1)
    lr = check_positive("lr", lr)
    penalty = check_float("penalty", penalty, low=0.0)
    boundary_steps = check_int("boundary_steps", boundary_steps, low=0)
    boundary_lr = check_float("boundary_lr", boundary_lr, low=0.0)
    boundary_every = check_int("boundary_every", boundary_every, low=1)
    penalty_warmup = check_float("penalty_warmup", penalty_warmup, low=0.0, high=1.0)
    seed = check_int("seed", seed, low=0)
    check_choice("rounding", rounding, ("nearest", "budget", "at_most"))
    check_choice("init_interval", init_interval, ("minmax", "percentile"))
    check_choice("layers", layers, ("site", "module"))
    params = validated(posterior, sites)
    groups = layer_groups(params, layers)
    prob = RandomBitsProblem(grouped_params(params, groups), candidates, init_interval)
    frac = prob.size / prob.size.sum()
    tau_raw = prob.tau(prob.alpha, prob.beta)
    norm = float(tau_raw.max()) if float(tau_raw.max()) > 0 else 1.0
    tau = tau_raw / norm

    phi, alpha, beta, tau, losses, warm_losses = _optimize_widths(
        prob, tau, norm, frac, gamma, num_steps=num_steps, lr=lr, penalty=penalty, penalty_warmup=penalty_warmup,
        boundary=(boundary_steps, boundary_lr, boundary_every), seed=seed)
    cand = prob.cand
    with torch.no_grad():
        p = torch.softmax(phi, -1)
        expected = p @ cand
        idx = _round_to_candidates(expected, cand)
        if rounding == "budget":
            idx = _budget_rounding(expected, idx, cand, frac, gamma)
        elif rounding == "at_most":
            idx = _at_most_rounding(expected, idx, cand, frac, gamma)
        final_loss = float((tau * p).sum() + penalty * (gamma - (frac * expected).sum()) ** 2)
    per_layer = {
        "expected_bits": dict(zip(prob.names, expected.tolist())), "probs": dict(zip(prob.names, p.tolist())),
        "alpha": dict(zip(prob.names, alpha.tolist())), "beta": dict(zip(prob.names, beta.tolist())),
    }
    layer_bits = {name: int(cand[i]) for name, i in zip(prob.names, idx.tolist())}
    # every result keyed by site name: a layer's sites share its width, interval and probabilities
    bits = {s: layer_bits[g] for g in prob.names for s in groups[g]}
    info = {"loss": losses + [final_loss], "optimized_loss": warm_losses,
            "expected_mean_bits": float((frac * expected).sum()),
            **{key: {s: v[g] for g in prob.names for s in groups[g]} for key, v in per_layer.items()},
            "tau_scale": norm, "target": gamma, "candidates": candidates, "layers": layers}
    loc_grids = {n: {"loc": IntervalQuantizer(b, interval=(info["alpha"][n], info["beta"][n]))} for n, b in bits.items()}
    locs = {n: params[n][0] for n in bits}
    return BitAllocation(bits, method="RB", sizes=site_sizes(params), grid="uniform-interval",
                         site_quantizers=loc_grids, info=info, training="data-free",
                         metadata_bits=decode_metadata_bits(loc_grids, bits, locs))


def _optimize_widths(prob: "RandomBitsProblem", tau, norm: float, frac, gamma: float, *, num_steps: int, lr: float,
                     penalty: float, penalty_warmup: float, boundary: tuple, seed: int):
    """Adam on the width logits ``phi`` against Eq. 9 with a warmed-up penalty, and the interval boundary
    updates (Eq. 12-13) every ``boundary[2]`` steps while the rounded mean is under the target."""
    boundary_steps, boundary_lr, boundary_every = boundary
    n, k = len(prob.names), len(prob.cand)
    alpha, beta = prob.alpha.clone(), prob.beta.clone()
    gen = torch.Generator().manual_seed(seed)
    phi = (1e-3 * torch.randn(n, k, generator=gen)).requires_grad_(True)
    moments = torch.zeros(n, k), torch.zeros(n, k)
    cand = prob.cand
    step_size = torch.full((n,), boundary_lr)
    losses, warm_losses = [], []
    with torch.enable_grad():
        for step in range(num_steps):
            p = torch.softmax(phi, dim=-1)
            expected = p @ cand
            exp_mean = (frac * expected).sum()
            warm = penalty_warmup * num_steps
            eta = penalty * (1e-3 ** max(0.0, 1.0 - step / warm) if warm > 0 else 1.0)
            loss = (tau * p).sum() + eta * (gamma - exp_mean) ** 2
            _adam_step_(phi, torch.autograd.grad(loss, phi)[0], moments, step, lr)
            with torch.no_grad():
                tau_term = float((tau * p).sum())
                gap2 = float((gamma - exp_mean) ** 2)
            losses.append(tau_term + penalty * gap2)  # Eq. 9 with the final eta
            warm_losses.append(tau_term + eta * gap2)
            if boundary_steps and (step + 1) % boundary_every == 0:
                with torch.no_grad():
                    idx = _round_to_candidates(torch.softmax(phi, -1) @ cand, cand)
                    hat_mean = float((frac * cand[idx]).sum())
                    if hat_mean < gamma:
                        alpha, beta, step_size = _boundary_updates(prob, alpha, beta, cand[idx], boundary_steps,
                                                                   step_size)
                        tau = prob.tau(alpha, beta) / norm
    return phi, alpha, beta, tau, losses, warm_losses


@torch.no_grad()
def _adam_step_(param: torch.Tensor, grad: torch.Tensor, moments: tuple, step: int, lr: float) -> None:
    """One Adam step on ``param`` in place (written out: an ``(N, K)`` tensor needs no optimizer object)."""
    m, v = moments
    m.mul_(0.9).add_(grad, alpha=1 - 0.9)
    v.mul_(0.999).addcmul_(grad, grad, value=1 - 0.999)
    param -= lr * (m / (1 - 0.9 ** (step + 1))) / ((v / (1 - 0.999 ** (step + 1))).sqrt() + 1e-8)


def _boundary_updates(prob: RandomBitsProblem, alpha, beta, bits, steps, step_size):
    """``steps`` guarded steps along Eq. 13 for every site at once."""
    t_now = prob.site_errors(alpha, beta, bits)
    for _ in range(steps):
        width = beta - alpha
        grad = 2.0 / width * t_now  # dT/dbeta (Eq. 13); dT/dalpha = -grad
        # scale-free step: move each boundary by step_size * width * t / (1 + t)
        move = step_size * width.pow(2) / 2.0 * grad / (1.0 + t_now)
        move = torch.minimum(move, 0.25 * width)
        new_alpha, new_beta = alpha + move, beta - move
        t_new = prob.site_errors(new_alpha, new_beta, bits)
        better = t_new < t_now
        alpha = torch.where(better, new_alpha, alpha)
        beta = torch.where(better, new_beta, beta)
        t_now = torch.where(better, t_new, t_now)
        step_size = torch.where(better, step_size, step_size / 2)
    return alpha, beta, step_size


def _budget_rounding(expected, idx, cand, frac, gamma):
    """Move sites between the neighbouring candidates of ``E[b_j]`` towards ``gamma``."""
    idx = idx.clone()
    lower = (torch.searchsorted(cand, expected, right=True) - 1).clamp(0, cand.numel() - 1)
    upper = torch.searchsorted(cand, expected).clamp(0, cand.numel() - 1)
    span = (cand[upper] - cand[lower]).clamp_min(1e-12)
    fraction = (expected - cand[lower]) / span
    mean = float((frac * cand[idx]).sum())
    if mean < gamma:
        order = torch.argsort(fraction, descending=True).tolist()
        for j in order:
            if idx[j] == upper[j]:
                continue
            new = mean + float(frac[j] * (cand[upper[j]] - cand[idx[j]]))
            if abs(new - gamma) < abs(mean - gamma):
                idx[j], mean = upper[j], new
    elif mean > gamma:
        order = torch.argsort(fraction).tolist()
        for j in order:
            if idx[j] == lower[j]:
                continue
            new = mean - float(frac[j] * (cand[idx[j]] - cand[lower[j]]))
            if abs(new - gamma) < abs(mean - gamma):
                idx[j], mean = lower[j], new
    return idx


def _at_most_rounding(expected, idx, cand, frac, gamma):
    """Lower sites one candidate at a time until the mean is at most ``gamma``, then raise sites while it stays so.

    Lowering: the smallest step that meets the bound if one does, otherwise the
    site whose ``E[b_j]`` is nearest the width below. Raising: sites in order of
    how far ``E[b_j]`` lies above their width.
    """
    idx = idx.clone()
    k = cand.numel()
    mean = float((frac * cand[idx]).sum())
    while mean > gamma + 1e-12:
        movable = [j for j in range(idx.numel()) if idx[j] > 0]
        drops = {j: float(frac[j] * (cand[idx[j]] - cand[idx[j] - 1])) for j in movable}
        fits = [j for j in movable if mean - drops[j] <= gamma + 1e-12]
        if fits:
            j = min(fits, key=lambda i: drops[i])
        else:
            j = min(movable, key=lambda i: float(expected[i] - cand[idx[i] - 1]))
        idx[j] -= 1
        mean -= drops[j]
    for j in torch.argsort(expected - cand[idx], descending=True).tolist():
        if idx[j] < k - 1:
            new = mean + float(frac[j] * (cand[idx[j] + 1] - cand[idx[j]]))
            if new <= gamma + 1e-12:
                idx[j], mean = idx[j] + 1, new
    return idx
