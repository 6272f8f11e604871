"""SMOL-style precision learning on a trained BNN's means, per parameter or per layer (SMOL-L).

Each weight ``w = c * theta`` of a site is written in units of a per-site
scale ``c = max|mu| / 2``, so ``theta`` lies in ``[-2, 2]``, the range of the
signed-bit value map ``v_j = 2**(1-j)``: with ``p`` signed bits a value can be
any odd multiple of ``2**(1-p)`` of magnitude below 2, i.e. ``2**p`` levels
(Appendix B's counting: no separate sign bit; the grid of
:func:`~pyro_bq.quant.grids.signed_grid` and
:class:`~pyro_bq.quant.SignedGridQuantizer`), and the rounding error is at
most ``2**(1-p)``.

Precision training (Eq. 11-12) replaces the rounding error by uniform noise
of the same size: ``theta + sigmoid(s) * eps`` with ``eps ~ U(-1, 1)`` and
``s = logit(2**(1-p))``, so ``sigmoid(s) = 2**(1-p)``; the penalty
``lambda * sum log2(1 + exp(-s))`` equals ``lambda * sum (p - 1)``. ``theta``
and ``s`` are trained together on the data's cross-entropy (``theta`` starting
at the posterior means and projected back to ``[-2, 2]`` after each step).
The learned precision of a weight is then ``ceil(p)`` (clamped to
``[1, max_bits]``), and ``theta`` is fine-tuned under quantization with the
straight-through estimator. With ``granularity="layer"`` (SMOL-L) there is
one ``s`` per site.

Readings of the paper (the SMOL appendix; its main text is not in our copy):

* No zero-precision allocation: ``p = 1 + log2(1 + exp(-s)) > 1`` for every
  finite ``s``, so every weight keeps at least one signed bit (Appendix C's
  zero-precision variant, used there for image generation, is not built).
* Projection: ``theta`` is kept in ``[-2, 2]``, the range of the value map
  ``v_j = 2**(1-j)`` the derivation assumes from Eq. 10 on (the appendix's
  own example projects onto ``[-1, 1]``, which would fit ``v_j = 2**-j``
  instead), and each weight is measured
  in units of a per-site scale ``c = max|mu| / 2`` (the appendix names no
  scale).
* Integer precision: ``ceil(p)`` (so the final rounding error, at most
  ``2**(1-ceil(p))``, never exceeds the noise the weight was trained under),
  clamped to ``[1, max_bits]``. As ``p > 1``, this gives at least 2 bits
  unless ``p`` is within ``1e-6`` of 1.
* Bits per parameter: the appendix counts each weight's signed bits. The
  allocation's ``code_bits`` is that count; ``storage_bits`` adds what a
  deployed per-parameter network must also store to decode the means: a
  4-bit width per weight (the packed file's bit map; our copy of the appendix
  reports bits per parameter and says nothing of what storing the precision
  map costs) and each site's scale, so a per-weight map costs about 4 bits
  per weight more than its code bits.
* SMOL trains on data (``training="trained"``), unlike the data-free
  Quantile Inform and Random Bits; tables say so.
* One noise draw per step (``K = 1`` in Eq. 11-12); the data term is the
  minibatch's mean cross-entropy of the deterministic network whose weights
  start at the BNN's posterior means (the paper trains a plain network).

Usage::

    alloc, tuned_guide = smol(model, guide, train, lam=1e-5)
    alloc["net.fc1.weight"]            # integer tensor of the site's shape
    qguide = quantize(tuned_guide, VPQ(8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyro_bq._validation import check_choice, check_float, check_int, check_positive, resolve_device
from pyro_bq.guides.quantized import copy_guide
from pyro_bq.inference.batches import as_batches
from pyro_bq.inference.prediction import batched_forward
from pyro_bq.quant.grids import check_bits, signed_grid, ste, uniform_quantize
from pyro_bq.quant.quantizers import SignedGridQuantizer

from .informativeness import BitAllocation, decode_metadata_bits, site_sizes, validated

__all__ = ["noise_amplitude", "s_from_bits", "bits_from_s", "smol_penalty", "smol", "site_scales", "with_locs"]

_LN2 = math.log(2.0)


def noise_amplitude(bits) -> torch.Tensor:
    """``2**(1-p)``: half-width of the uniform noise standing in for ``p``-bit rounding."""
    return torch.pow(2.0, 1.0 - torch.as_tensor(bits, dtype=torch.float64))


def s_from_bits(bits) -> torch.Tensor:
    """``s = logit(2**(1-p))`` (requires ``p > 1``; ``p -> 1`` as ``s -> inf``).

    :param bits: the precision ``p``: a finite real number > 1 or a real tensor of them.
    :raises TypeError: if ``bits`` is neither a real number nor a real tensor.
    :raises ValueError: if some ``bits`` is not finite or not > 1.
    """
    if isinstance(bits, torch.Tensor):
        if bits.dtype == torch.bool or bits.is_complex():
            raise TypeError(f"bits must be a real number or a real tensor, got a tensor of dtype {bits.dtype}")
        b = bits.to(torch.float64)
    else:
        b = torch.tensor(check_float("bits", bits), dtype=torch.float64)
    if b.numel() and not bool(((b > 1) & torch.isfinite(b)).all()):
        bad = b[~((b > 1) & torch.isfinite(b))].flatten()[:3].tolist()
        raise ValueError(f"bits must be finite and > 1 for a finite s = logit(2**(1-p)), got {bad}")
    return torch.logit(noise_amplitude(b))


def bits_from_s(s: torch.Tensor) -> torch.Tensor:
    """``p = 1 + log2(1 + exp(-s))``, the inverse of :func:`s_from_bits`."""
    return 1.0 + F.softplus(-s) / _LN2


def smol_penalty(s: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * sum(log2(1 + exp(-s)))`` (Eq. 12), computed stably."""
    return lam * (F.softplus(-s) / _LN2).sum()


def site_scales(params) -> dict[str, float]:
    """Per-site scale ``c = max|mu| / 2`` (so ``mu / c`` lies in ``[-2, 2]``)."""
    out = {}
    for name, (loc, _) in params.items():
        m = float(loc.abs().max())
        out[name] = m / 2 if m > 0 else 1.0
    return out


def smol(
    model,
    guide,
    data,
    *,
    lam: float = 1e-5,
    granularity: str = "parameter",
    precision_steps: int = 300,
    finetune_steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    s_lr: float = 2e-2,
    finetune_lr: float = 3e-4,
    init_bits: float = 8.0,
    max_bits: int = 8,
    seed: int = 0,
    sites=None,
    device=None,
):
    """Learn per-parameter (or per-site) precisions, then fine-tune the means under them.

    :param model: the :class:`~pyro_bq.models.BayesianClassifier` (its deterministic
        network runs through :func:`~pyro_bq.inference.batched_forward`).
    :param guide: the trained guide; it is not modified.
    :param data: training examples: an :class:`~pyro_bq.data.InMemoryDataset` (cut into shuffled
        batches of ``batch_size``), a ``DataLoader`` or a re-iterable of ``(x, y)`` batches
        (read through :func:`~pyro_bq.inference.as_batches`, epoch after epoch).
    :param device: where training runs (``"auto"``, ``"cpu"``, ``"cuda"``); default where the
        guide's means are. The noise of the precision phase is drawn on the CPU from ``seed``,
        so it is the same on every device.
    :param lam: ``lambda`` of Eq. 12 (larger: fewer bits). The data term is the
        mean cross-entropy of a minibatch.
    :param granularity: ``"parameter"`` (SMOL) or ``"layer"`` (SMOL-L).
    :param precision_steps, finetune_steps: minibatch steps of each phase.
    :param init_bits: starting precision (> 1).
    :param max_bits: largest precision handed out.
    :returns: ``(allocation, tuned_guide)``: a :class:`BitAllocation` (integer
        tensors of each site's shape, or ints for SMOL-L; ``grid="signed"`` and
        a :class:`~pyro_bq.quant.SignedGridQuantizer` per site; ``info`` holds
        ``scales``, ``locs`` (the quantized means), the continuous mean
        precision and the loss histories) and a copy of ``guide`` whose means
        are the fine-tuned float means.
    """
    lam = check_float("lam", lam, low=0.0)
    check_choice("granularity", granularity, ("parameter", "layer"))
    precision_steps = check_int("precision_steps", precision_steps, low=0)
    finetune_steps = check_int("finetune_steps", finetune_steps, low=0)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr, s_lr, finetune_lr = (check_positive(n, v) for n, v in (("lr", lr), ("s_lr", s_lr), ("finetune_lr", finetune_lr)))
    init_bits = check_float("init_bits", init_bits, low=1.0, low_open=True)
    max_bits = check_bits("max_bits", max_bits)
    seed = check_int("seed", seed, low=0)

    params = validated(guide, sites)
    device = next(iter(params.values()))[0].device if device is None else resolve_device(device)
    batches = as_batches(data, batch_size=batch_size, device=device, name="data")
    names, sizes, scales = list(params), site_sizes(params), site_scales(params)
    fixed = {n: loc[None].to(device) for n, (loc, _) in validated(guide).items() if n not in params}
    theta = {n: (params[n][0].to(device) / scales[n]).clamp(-2, 2).clone().requires_grad_(True) for n in names}
    s0 = float(s_from_bits(init_bits))
    shape = {n: params[n][0].shape if granularity == "parameter" else () for n in names}
    s = {n: torch.full(shape[n], s0, device=device).requires_grad_(True) for n in names}

    def cross_entropy(weights, xb, yb):
        full = {**fixed, **{n: scales[n] * w[None] for n, w in weights.items()}}
        return F.cross_entropy(batched_forward(model, full, xb)[0], yb)

    precision_loss = _learn_precisions(theta, s, cross_entropy, lam, _steps(batches, seed, precision_steps, 0),
                                       lr, s_lr, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cont = {n: bits_from_s(s[n].detach()).expand_as(theta[n]) for n in names}
        bits = {n: torch.ceil(cont[n] - 1e-6).clamp(1, max_bits).to(torch.int64) for n in names}
        grids = {n: signed_grid(bits[n], torch.tensor(1.0, device=device)) for n in names}
        cont_mean = sum(float(cont[n].double().sum()) for n in names) / sum(sizes[n] for n in names)
    finetune_loss = _finetune(theta, grids, cross_entropy, _steps(batches, seed, finetune_steps, 10_000),
                              finetune_lr)
    with torch.no_grad():
        locs = {n: scales[n] * uniform_quantize(theta[n].detach(), *grids[n]) for n in names}
        float_locs = {n: scales[n] * theta[n].detach() for n in names}
    out_bits = bits if granularity == "parameter" else {n: int(bits[n].flatten()[0]) for n in names}
    info = {"scales": scales, "locs": locs, "lambda": lam, "continuous_mean_bits": cont_mean,
            "precision_loss": precision_loss, "finetune_loss": finetune_loss}
    loc_grids = {n: {"loc": SignedGridQuantizer(b, scale=scales[n])} for n, b in out_bits.items()}
    alloc = BitAllocation(out_bits, method="SMOL" if granularity == "parameter" else "SMOL-L", sizes=sizes,
                          grid="signed", site_quantizers=loc_grids, info=info, training="trained",
                          metadata_bits=decode_metadata_bits(loc_grids, out_bits, float_locs))
    return alloc, with_locs(guide, float_locs)


def _learn_precisions(theta: dict, s: dict, cross_entropy, lam: float, batches, lr: float, s_lr: float, gen) -> list:
    """Train ``theta`` and the precisions ``s`` under uniform noise of the rounding error's size, plus
    the penalty (Eq. 11-12); returns the (cross-entropy, penalty) of each step."""

    def loss_of(xb, yb):
        noisy = {n: t + torch.sigmoid(s[n]) * (torch.rand(t.shape, generator=gen) * 2 - 1).to(t.device)
                 for n, t in theta.items()}
        ce = cross_entropy(noisy, xb, yb)
        pen = sum(smol_penalty(s[n].expand_as(t), lam) for n, t in theta.items())
        return ce + pen, (float(ce.detach()), float(pen.detach()))

    opt = torch.optim.Adam([{"params": list(theta.values()), "lr": lr}, {"params": list(s.values()), "lr": s_lr}])
    return _train(theta, opt, batches, loss_of)


def _finetune(theta: dict, grids: dict, cross_entropy, batches, lr: float) -> list:
    """Train ``theta`` on its signed grids with a straight-through gradient; returns each step's cross-entropy."""

    def loss_of(xb, yb):
        ce = cross_entropy({n: ste(t, uniform_quantize(t.detach(), *grids[n])) for n, t in theta.items()}, xb, yb)
        return ce, float(ce.detach())

    return _train(theta, torch.optim.Adam(list(theta.values()), lr=lr), batches, loss_of)


def _steps(batches, seed: int, steps: int, epoch0: int):
    """``steps`` checked minibatches ``(x, y)`` of ``batches``, epoch after epoch from ``epoch0``."""
    done, epoch = 0, epoch0
    while done < steps:
        empty = True
        for _, xb, yb in batches.epoch(epoch, seed):
            empty = False
            yield xb, yb
            done += 1
            if done >= steps:
                return
        if empty:
            raise ValueError(f"{batches.name} yielded no batches in epoch {epoch}; it must hold at least one")
        epoch += 1


def _train(theta: dict, opt, batches, loss_of) -> list:
    """One optimizer step per minibatch on ``loss_of(x, y) -> (loss, record)``, ``theta`` kept in
    ``[-2, 2]``; returns the records."""
    records = []
    with torch.enable_grad():
        for xb, yb in batches:
            loss, record = loss_of(xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for t in theta.values():
                    t.clamp_(-2, 2)
            records.append(record)
    return records


def with_locs(guide, locs: dict):
    """A copy of a mean-field guide whose means at the sites of ``locs`` are replaced.

    Works for guides that keep all means in one flat ``loc`` parameter with
    ``guide.sites[name].offset`` (e.g. :class:`~pyro_bq.guides.AutoMeanFieldNormal`).

    Usage::

        tuned = with_locs(guide, {"net.fc1.weight": new_means})
    """
    if not hasattr(guide, "loc") or not isinstance(getattr(guide, "loc", None), torch.Tensor):
        raise TypeError(
            f"with_locs needs a guide with one flat 'loc' parameter (AutoMeanFieldNormal), got {type(guide).__name__}"
        )
    new = copy_guide(guide)
    with torch.no_grad():
        for name, value in locs.items():
            info = new.sites[name]
            new.loc[info.offset : info.offset + info.numel] = value.reshape(-1).to(new.loc)
    return new
