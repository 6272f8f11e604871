"""Weight informativeness ``|mu| / sigma`` and its per-layer aggregates.

Every function takes a *posterior*: either a trained pyro_bq guide (any
:class:`~pyro_bq.guides.AutoGaussianSites`, read through its public
``get_loc_scale``) or a mapping ``{site_name: (loc, scale)}``. Results are
keyed by Pyro site name, in the guide's site order.

Readings of the paper (Quantile Inform / Random Bits):

* A "layer" ``l_j`` is, by default, one Pyro sample site: a network layer's
  weight and its bias are two layers, each with its own aggregate, width and
  grid. The paper's layer is the set of a network layer's weights; the
  allocators offer it as ``layers="module"`` (:func:`layer_groups`: a
  module's weight and bias share one aggregate, one width and, on the
  uniform grids, one interval). Results are keyed by site name either way.
  The default stays per site because a bias is small and its own grid costs
  almost nothing (see the measurements in the README).
* Informativeness is ``|mu| / sigma`` with the standard deviation, as Eq. 1
  is written; the sentences around Eq. 1 and in the appendix call it a ratio
  to the variance (``|mu| / sigma**2``), which we do not use.
* Entropy aggregation (Eq. 15): a site of one weight has ``max H = log 1 = 0``;
  we give it confidence 1. A site whose means are all zero has no
  distribution ``p_w``; we give it 0.
* Min-max normalisation is undefined when every site has the same value;
  all then get 1.
* Bit counts: the paper's mean bit-width (Eq. 8) is
  :attr:`BitAllocation.code_bits`, the weights' own codes. A deployed
  network also stores each layer's grid (an interval, a scale) and, for a
  per-weight map, each weight's width; :attr:`BitAllocation.storage_bits`
  counts those too, as a packed file holds them.

Usage::

    info = layer_informativeness(guide, aggregate="entropy")
    norm = normalized_informativeness(info)        # in [0, 1], square-rooted
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Iterable, Optional, Union

import torch

from pyro_bq._validation import check_choice, check_site_names, check_str, check_tensor
from pyro_bq.quant.grids import MAX_BITS, check_bits
from pyro_bq.quant.quantizers import Quantizer

__all__ = [
    "posterior_params",
    "site_sizes",
    "informativeness",
    "layer_informativeness",
    "normalized_informativeness",
    "mean_bits",
    "BitAllocation",
    "check_candidate_bits",
    "check_target",
    "decode_metadata_bits",
    "layer_groups",
    "grouped_params",
    "TRAINING_LABELS",
]

#: what an allocator learns from: ``"data-free"`` (only the posterior) or ``"trained"`` (it trains on data)
TRAINING_LABELS = ("data-free", "trained")


def posterior_params(posterior, sites: Optional[Iterable[str]] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{site: (loc, scale)}`` as detached tensors, validated.

    :param posterior: a pyro_bq guide (``AutoGaussianSites``; it must have been
        run or ``setup`` once) or a mapping ``{site: (loc, scale)}``.
    :param sites: optional subset of site names: one name or a collection of
        them (default: all, in guide order).
    :raises TypeError: if ``posterior`` is neither, or ``sites`` is not a site
        name or a collection of site names.
    :raises ValueError: on unknown, repeated or no sites, shape mismatches,
        non-finite values or a scale that is not strictly positive.
    """
    if isinstance(posterior, Mapping):
        raw = dict(posterior)
        if not raw:
            raise ValueError("posterior must map at least one site name to (loc, scale); got an empty mapping")
        get = raw.__getitem__
        names = list(raw)
    elif hasattr(posterior, "get_loc_scale") and hasattr(posterior, "sites"):
        if not posterior.sites:
            raise ValueError(
                "posterior is a guide without sites yet: run it once on example inputs or call guide.setup(x, y)"
            )
        get = posterior.get_loc_scale
        names = list(posterior.sites)
    else:
        raise TypeError(
            "posterior must be a pyro_bq guide (AutoGaussianSites) or a mapping {site_name: (loc, scale)}, "
            f"got {type(posterior).__name__}"
        )
    if sites is not None:
        names = check_site_names("sites", sites, names)
    out = {}
    with torch.no_grad():
        for name in names:
            pair = get(name)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"posterior[{name!r}] must be a (loc, scale) pair of tensors")
            loc, scale = (torch.as_tensor(v).detach() for v in pair)
            if loc.shape != scale.shape:
                raise ValueError(
                    f"site {name!r}: loc has shape {tuple(loc.shape)} but scale has shape {tuple(scale.shape)}"
                )
            if loc.numel() == 0:
                raise ValueError(f"site {name!r} is empty")
            if not bool(torch.isfinite(loc).all()):
                raise ValueError(f"site {name!r}: loc must be finite")
            if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                bad = scale[~(torch.isfinite(scale) & (scale > 0))].flatten()[:3].tolist()
                raise ValueError(
                    f"site {name!r}: sigma (the posterior scale) must be finite and > 0 everywhere; "
                    f"found values such as {bad}"
                )
            out[name] = (loc.float(), scale.float())
    return out


def site_sizes(params: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
    """Number of weights per site."""
    return {name: int(loc.numel()) for name, (loc, _) in params.items()}


def informativeness(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-weight informativeness ``|loc| / scale`` (Eq. 1).

    :param loc: posterior means, a floating-point tensor.
    :param scale: posterior scales, a floating-point tensor of the same shape.
    :raises TypeError: if ``loc`` or ``scale`` is not a floating-point tensor.
    :raises ValueError: if the shapes differ, ``loc`` is not finite or
        ``scale`` is not finite and strictly positive.
    """
    check_tensor("loc", loc, floating=True)
    check_tensor("scale", scale, floating=True)
    if loc.shape != scale.shape:
        raise ValueError(f"loc and scale must have the same shape, got {tuple(loc.shape)} and {tuple(scale.shape)}")
    if not bool(torch.isfinite(loc).all()):
        raise ValueError("loc must be finite everywhere (it holds NaN or inf)")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError("scale (sigma) must be finite and > 0 everywhere")
    return _informativeness(loc, scale)


def _informativeness(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``|loc| / scale`` of already validated tensors (internal)."""
    return loc.abs() / scale


def layer_informativeness(posterior, aggregate: str = "mean", sites=None) -> dict[str, float]:
    """Aggregate informativeness per site.

    ``aggregate="mean"``: the mean of ``|mu|/sigma`` over the site (Eq. 2).
    ``aggregate="entropy"``: the confidence ``1 - H / log n`` of the site, where
    ``H`` is the entropy of the weights' informativeness normalised to sum to
    one (Eq. 15); a single-weight site has confidence 1.
    """
    check_choice("aggregate", aggregate, ("mean", "entropy"))
    params = validated(posterior, sites)
    out = {}
    for name, (loc, scale) in params.items():
        info = _informativeness(loc, scale).flatten().double()
        if aggregate == "mean":
            out[name] = float(info.mean())
        else:
            n = info.numel()
            total = info.sum()
            if n == 1 or total <= 0:
                out[name] = 1.0 if n == 1 else 0.0
                continue
            p = info / total
            h = -(torch.special.xlogy(p, p)).sum()
            out[name] = float(1.0 - h / math.log(n))
    return out


def normalized_informativeness(layer_info: Mapping[str, float]) -> dict[str, float]:
    """Min-max normalise per-layer informativeness to [0, 1], then take the square root.

    When every layer has the same value, all get 1 (no layer is less informative).
    """
    if not layer_info:
        raise ValueError("layer_info must hold at least one site")
    values = torch.tensor([float(v) for v in layer_info.values()], dtype=torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("layer informativeness must be finite")
    lo, hi = values.min(), values.max()
    if hi - lo <= 0:
        norm = torch.ones_like(values)
    else:
        norm = ((values - lo) / (hi - lo)).sqrt()
    return {name: float(v) for name, v in zip(layer_info, norm)}


def _is_params(obj) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], torch.Tensor) for v in obj.values()
    ) and getattr(obj, "_validated", False)


class _Params(dict):
    """A validated ``{site: (loc, scale)}`` dict (internal)."""

    _validated = True


def validated(posterior, sites=None) -> "_Params":
    """Internal: validated params, reused without re-checking."""
    if _is_params(posterior):
        if sites is None:
            return posterior
        return _Params({name: posterior[name] for name in check_site_names("sites", sites, list(posterior))})
    return _Params(posterior_params(posterior, sites))


def mean_bits(bits: Mapping[str, Union[int, float, torch.Tensor]], sizes: Mapping[str, int]) -> float:
    """Mean bits per weight, weighted by site size (Eq. 8).

    ``bits[site]`` is a number (one width for the whole site) or a tensor of the
    site's shape (per-parameter widths); every width must be finite and lie in
    ``[1, 16]``. ``bits`` and ``sizes`` must name the same sites.

    :param bits: ``{site: width}``.
    :param sizes: ``{site: number of weights}`` (ints >= 1).
    :raises TypeError: if either is not a mapping, or holds a value of the wrong type.
    :raises ValueError: for a width outside ``[1, 16]`` or not finite, a size
        below 1, or sites named in one mapping but not the other.

    Usage::

        mean_bits({"a": 2, "b": 8}, {"a": 3, "b": 1})   # 3.5
    """
    sizes = _check_sizes(sizes)
    if not isinstance(bits, Mapping):
        raise TypeError(f"bits must be a mapping {{site_name: bits}}, got {type(bits).__name__}")
    if not bits:
        raise ValueError("bits must name at least one site")
    _check_same_sites(bits, sizes)
    total, count = 0.0, 0
    for name, b in bits.items():
        n = sizes[name]
        total += _site_bit_total(name, b, n, integer=False)
        count += n
    return total / count


def _check_sizes(sizes) -> dict[str, int]:
    """``sizes`` as a dict of ints >= 1 (internal)."""
    if not isinstance(sizes, Mapping):
        raise TypeError(f"sizes must be a mapping {{site_name: number of weights}}, got {type(sizes).__name__}")
    if not sizes:
        raise ValueError("sizes must name at least one site")
    out = {}
    for name, n in sizes.items():
        if isinstance(n, torch.Tensor) and n.numel() == 1 and not n.is_floating_point() and n.dtype != torch.bool:
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"sizes[{name!r}] must be an int (the site's number of weights), got {n!r}")
        if n < 1:
            raise ValueError(f"sizes[{name!r}] must be >= 1 (a site holds at least one weight), got {n}")
        out[name] = int(n)
    return out


def _check_same_sites(bits: Mapping, sizes: Mapping) -> None:
    missing = [k for k in sizes if k not in bits]
    extra = [k for k in bits if k not in sizes]
    if extra:
        raise ValueError(f"bits names site(s) {extra} that sizes does not list (sizes has {list(sizes)})")
    if missing:
        raise ValueError(f"bits gives no width for site(s) {missing} of sizes; give one for every site")


def _site_bit_total(name: str, b, n: int, *, integer: bool) -> float:
    """Sum of the widths of one site of ``n`` weights, validated (internal).

    ``integer=True`` accepts only ints and integer tensors.
    """
    what = "an int or an integer tensor" if integer else "a number or a tensor"
    if isinstance(b, torch.Tensor):
        if b.dtype == torch.bool or b.is_complex() or (integer and b.is_floating_point()):
            raise TypeError(f"bits[{name!r}] must be {what} of widths, got a tensor of dtype {b.dtype}")
        if b.numel() == 0:
            raise ValueError(f"bits[{name!r}] is an empty tensor")
        if b.numel() > 1 and b.numel() != n:
            raise ValueError(f"bits[{name!r}] has {b.numel()} entries, the site has {n} weights")
        lo, hi = torch.aminmax(b.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= 1 and hi <= MAX_BITS):  # also false for NaN
            raise ValueError(f"bits[{name!r}] must hold finite widths in [1, {MAX_BITS}], got values in [{lo}, {hi}]")
        return float(b.double().sum()) if b.numel() > 1 else float(b) * n
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(b, bool) or not isinstance(b, kinds):
        raise TypeError(f"bits[{name!r}] must be {what}, got {type(b).__name__} ({b!r})")
    v = float(b)
    if not (1 <= v <= MAX_BITS):  # also false for NaN
        raise ValueError(f"bits[{name!r}] must be a finite width in [1, {MAX_BITS}], got {b!r}")
    return v * n


class BitAllocation(dict):
    """A bit map ``{site_name: bits}`` plus what produced it.

    It *is* a ``dict`` keyed by Pyro site name, with an ``int`` per site for
    per-layer allocators or an integer tensor of the site's shape for
    per-parameter ones, so it can be handed to any quantization policy that
    takes per-site bits. Extra attributes:

    * ``method``: e.g. ``"QIU"``, ``"QINU"``, ``"RB"``, ``"SMOL"``;
    * ``code_bits``: mean bits per weight of the weights' own codes, weighted
      by site size (Eq. 8); ``mean_bits`` is the same number;
    * ``storage_bits``: bits per weight of everything a packed file needs to
      decode the quantized means: the codes, a 4-bit width per weight where a
      site has per-weight widths (the file's bit map), and each site's grid
      data (interval, scale or codebook), as
      :func:`~pyro_bq.io.memory_report` counts them; ``None`` when the grid
      data was not given (``metadata_bits``);
    * ``training``: ``"data-free"`` (the allocator reads only the posterior:
      Quantile Inform, Random Bits) or ``"trained"`` (it trains on data: SMOL);
    * ``sizes``: weights per site;
    * ``grid``: the name of the grid the allocator quantizes each site's means
      on (``"uniform-percentile"``, ``"gaussian-lloyd"``, ``"uniform-interval"``, ``"signed"``);
    * ``site_quantizers``: ``{site: {"loc": Quantizer}}``, that grid as
      quantizer templates (empty: a policy's own grid);
    * ``site_bits``: ``{site: {"loc": bits, "sample": bits}}``, the widths for
      a policy's means and samples (its scales keep the policy's own bits);
    * ``info``: method-specific details (scale factor, boundaries, loss history, ...).

    An allocation becomes a policy through a plain constructor call:
    ``JQ(8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers)``.

    :param bits: ``{site_name: width}``: an int in ``[1, 16]`` or an integer
        tensor of such widths with one entry per weight of the site.
    :param method: name of the allocator.
    :param sizes: ``{site_name: number of weights}`` for the same sites (ints >= 1).
    :param grid: the name of the grid the allocator expects.
    :param info: method-specific details (a dict or None).
    :param site_quantizers: ``{site: {"loc": Quantizer}}`` for sites of ``bits``, or None.
    :param training: ``"data-free"`` or ``"trained"``.
    :param metadata_bits: ``{site: bits}``, the grid data each site's means need
        in a packed file (:func:`decode_metadata_bits`), or None.
    :raises TypeError: for a ``bits``/``sizes``/``info``/``site_quantizers`` of
        the wrong type or a width that is not an int.
    :raises ValueError: for widths outside ``[1, 16]``, sizes below 1, or
        ``bits``, ``sizes`` and ``site_quantizers`` naming different sites.

    Usage::

        alloc = quantile_inform(guide, 3.2)
        alloc["net.fc1.weight"], alloc.code_bits, alloc.storage_bits, alloc.training
        qguide = quantize(guide, VPQ(8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers))
    """

    def __init__(self, bits, *, method: str, sizes: Mapping[str, int], grid: str, info: Optional[dict] = None,
                 site_quantizers: Optional[Mapping[str, Mapping[str, Quantizer]]] = None,
                 training: str = "data-free", metadata_bits: Optional[Mapping[str, int]] = None):
        if not isinstance(bits, Mapping):
            raise TypeError(f"bits must be a mapping {{site_name: bits}}, got {type(bits).__name__}")
        sizes = _check_sizes(sizes)
        if not bits:
            raise ValueError("bits must name at least one site")
        _check_same_sites(bits, sizes)
        total = sum(_site_bit_total(name, b, sizes[name], integer=True) for name, b in bits.items())
        if info is not None and not isinstance(info, Mapping):
            raise TypeError(f"info must be a dict or None, got {type(info).__name__}")
        super().__init__(bits)
        self.method = check_str("method", method)
        self.sizes = sizes
        self.grid = check_str("grid", grid)
        self.info = dict(info or {})
        count = sum(sizes.values())
        self.code_bits = total / count
        self.mean_bits = self.code_bits
        self.site_quantizers = _check_site_quantizers(site_quantizers or {}, bits)
        self.training = check_choice("training", training, TRAINING_LABELS)
        self.metadata_bits = None if metadata_bits is None else _check_metadata_bits(metadata_bits, bits)
        self.storage_bits = None
        if self.metadata_bits is not None:
            bitmap = sum(4 * sizes[n] for n, b in bits.items() if isinstance(b, torch.Tensor))
            self.storage_bits = (total + bitmap + sum(self.metadata_bits.values())) / count

    @property
    def site_bits(self) -> dict[str, dict]:
        """``{site: {"loc": bits, "sample": bits}}``: the widths as a policy's ``site_bits``."""
        return {name: {"loc": b, "sample": b} for name, b in self.items()}

    def layer_bits(self) -> dict[str, float]:
        """Bits per site: the width, or the mean width for per-parameter maps."""
        return {k: (float(v.double().mean()) if isinstance(v, torch.Tensor) else float(v)) for k, v in self.items()}

    def __repr__(self) -> str:
        storage = "None" if self.storage_bits is None else f"{self.storage_bits:.3f}"
        return (f"BitAllocation({self.method}, code_bits={self.code_bits:.3f}, storage_bits={storage}, "
                f"{self.training}, sites={len(self)})")


def _check_metadata_bits(value, bits: Mapping) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise TypeError(f"metadata_bits must be a mapping {{site: bits}}, got {type(value).__name__}")
    _check_same_sites(value, bits)
    out = {}
    for name, v in value.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"metadata_bits[{name!r}] must be an int >= 0, got {v!r}")
        out[name] = int(v)
    return out


def decode_metadata_bits(site_quantizers: Mapping, bits: Mapping, locs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Bits of grid data (interval, scale, codebook) a packed file holds to decode each site's means.

    Each template of ``site_quantizers[site]["loc"]`` is set to the site's
    width, calibrated on ``locs[site]`` and asked for its
    :meth:`~pyro_bq.quant.Quantizer.metadata_bits`, the count
    :func:`~pyro_bq.io.memory_report` uses.

    Usage::

        meta = decode_metadata_bits(alloc.site_quantizers, alloc, {n: loc for n, (loc, _) in params.items()})
    """
    out = {}
    for name, b in bits.items():
        template = site_quantizers[name]["loc"]
        out[name] = int(template.with_bits(b).calibrate(locs[name]).metadata_bits())
    return out


def _check_site_quantizers(value, bits: Mapping) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError(f"site_quantizers must be a mapping {{site: {{'loc': Quantizer}}}}, got {type(value).__name__}")
    for name, per in value.items():
        if name not in bits:
            raise ValueError(f"site_quantizers names site {name!r}, which bits does not list")
        if not isinstance(per, Mapping) or not all(isinstance(q, Quantizer) for q in per.values()):
            raise TypeError(f"site_quantizers[{name!r}] must map quantities to Quantizers, got {per!r:.80}")
    return {name: dict(per) for name, per in value.items()}


def check_candidate_bits(candidate_bits) -> list[int]:
    """Sorted unique positive ints; raises on an empty or invalid set."""
    if isinstance(candidate_bits, (str, bytes)) or not hasattr(candidate_bits, "__iter__"):
        raise TypeError(f"candidate_bits must be an iterable of ints, got {type(candidate_bits).__name__}")
    values = list(candidate_bits)
    if not values:
        raise ValueError("candidate_bits must hold at least one bit-width (e.g. range(2, 9)); got an empty set")
    ints = [int(v) if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() else v
            for v in values]
    return sorted({check_bits("candidate_bits", v) for v in ints})


def check_target(target_mean_bits, candidates: list[int]) -> float:
    """A finite number within ``[min(candidates), max(candidates)]``."""
    if isinstance(target_mean_bits, bool) or not isinstance(target_mean_bits, (int, float)):
        raise TypeError(f"target_mean_bits must be a number, got {type(target_mean_bits).__name__}")
    g = float(target_mean_bits)
    if not math.isfinite(g) or not candidates[0] <= g <= candidates[-1]:
        raise ValueError(
            f"target_mean_bits must lie within the candidate range [{candidates[0]}, {candidates[-1]}], got {g}"
        )
    return g


def layer_groups(names: Iterable[str], layers: str = "site") -> dict[str, list[str]]:
    """What one "layer" of the allocators is: ``{layer name: [site names]}``.

    ``layers="site"``: every Pyro site is a layer of its own (a network
    layer's weight and bias get separate widths and grids).
    ``layers="module"``: the sites of one module (the site name without its
    last dotted part, e.g. ``net.fc1`` for ``net.fc1.weight`` and
    ``net.fc1.bias``) form one layer, as the paper's layer ``l_j`` is the set
    of a network layer's weights: one width and one grid for them all.

    Usage::

        layer_groups(["net.fc1.weight", "net.fc1.bias"], "module")   # {"net.fc1": [both]}
    """
    check_choice("layers", layers, ("site", "module"))
    names = list(names)
    if layers == "site":
        return {n: [n] for n in names}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
    return groups


def grouped_params(params: Mapping[str, tuple[torch.Tensor, torch.Tensor]], groups: Mapping[str, list[str]]) -> "_Params":
    """``{layer: (loc, scale)}``: each layer's sites' means and scales, flattened and joined (internal)."""
    out = _Params()
    for g, members in groups.items():
        if len(members) == 1 and members[0] == g:
            out[g] = params[g]
        else:
            out[g] = tuple(torch.cat([params[m][i].flatten() for m in members]) for i in (0, 1))
    return out
