"""Memory accounting of (quantized) guides: :func:`memory_report`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import torch

from pyro_bq.guides.quantized import (DETERMINISTIC_THRESHOLD, VARYING_DRAWS, QuantizedGuide, deterministic_sites,
                                      varying_fraction)

from .packed import KIND, build_meta, encode_guide

__all__ = ["memory_report", "MemoryReport", "SiteMemory"]

# container framing: magic + version + header length, and the SHA-256 digest
_FRAMING = 8 + 4 + 8 + 32


@dataclass
class SiteMemory:
    """Bits one site takes in the packed file.

    Usage::

        for row in memory_report(qguide).sites:
            print(row.name, row.bits_per_param)
    """

    name: str
    numel: int
    code_bits: int
    float_bits: int
    metadata_bits: int
    bitmap_bits: int
    #: the code streams (codes and bit maps) at their fixed bit widths
    fixed_width_bits: int = 0
    #: the empirical entropy of the code streams (what an ideal coder with their own frequencies spends)
    entropy_bits: float = 0.0
    #: the bits the file spends on the code streams (with a codec: coded bytes plus their models)
    actual_bits: int = 0
    #: fraction of the site's weights whose draws are not all equal (:func:`~pyro_bq.guides.varying_fraction`)
    varying_fraction: float = 1.0
    #: how the site's sampled weights are rounded: ``"float"`` (not quantized) or a rule of
    #: :data:`~pyro_bq.quant.grids.ROUNDINGS`
    rounding: str = "float"
    #: the weights whose draws are rounded stochastically (:meth:`~pyro_bq.quant.Quantizer.stochastic_mask`)
    stochastic_weights: int = 0

    @property
    def normals_per_draw(self) -> int:
        """Gaussian random numbers a device draws for this site per weight draw (one per weight)."""
        return self.numel

    @property
    def uniforms_per_draw(self) -> int:
        """Uniform random numbers per weight draw: one per weight whose draws are rounded stochastically."""
        return self.stochastic_weights

    @property
    def total_bits(self) -> int:
        return self.code_bits + self.float_bits + self.metadata_bits + self.bitmap_bits

    @property
    def bits_per_param(self) -> float:
        return self.total_bits / self.numel


@dataclass
class MemoryReport:
    """What :func:`memory_report` returns.

    ``bits_per_param`` counts codes, float quantities, calibration metadata
    (ranges, zero points, exponent windows, codebooks) and per-element bit
    maps, per weight of the guide; the float guide takes 64 (a float32 loc
    and scale). ``payload_bytes`` is the data section of the packed file,
    ``file_bytes`` the whole file (header and checksum included); the
    ``float_*`` fields are the same figures for the float guide.
    ``varying_fraction`` is the fraction of all weights whose draws are not all
    equal (per site in ``sites``; :func:`~pyro_bq.guides.varying_fraction`), and
    ``deterministic_sites`` lists the sites below
    :data:`~pyro_bq.guides.DETERMINISTIC_THRESHOLD` (effectively deterministic:
    their draws agree, so they add no epistemic uncertainty).
    ``normals_per_draw`` and ``uniforms_per_draw`` are the random numbers a
    device computes per weight draw: one Gaussian per weight, plus one uniform
    per weight whose draws are rounded stochastically (every weight of a site
    whose ``rounding`` is ``"stochastic"`` or ``"stochastic-matched"``, the
    weights of its :meth:`~pyro_bq.quant.Quantizer.stochastic_mask` for
    ``"stochastic-matched-or-nearest"``); the variance-matched rule's smaller
    noise scale and that mask are fixed per weight, so they can be computed
    once, not per draw.

    Usage::

        report = memory_report(qguide)
        print(report.table())
        assert report.file_bytes <= report.float_file_bytes / 7
    """

    sites: list = field(default_factory=list)
    num_params: int = 0
    total_bits: int = 0
    payload_bytes: int = 0
    file_bytes: int = 0
    float_payload_bytes: int = 0
    float_file_bytes: int = 0
    varying_fraction: float = 1.0
    deterministic_sites: list = field(default_factory=list)

    @property
    def bits_per_param(self) -> float:
        return self.total_bits / max(1, self.num_params)

    @property
    def float_bits_per_param(self) -> float:
        return 64.0

    @property
    def normals_per_draw(self) -> int:
        """Gaussian random numbers per weight draw of the whole guide."""
        return sum(s.normals_per_draw for s in self.sites)

    @property
    def uniforms_per_draw(self) -> int:
        """Uniform random numbers per weight draw (stochastic rounding), 0 with round to nearest."""
        return sum(s.uniforms_per_draw for s in self.sites)

    @property
    def compression(self) -> float:
        """Float file size over this file's size."""
        return self.float_file_bytes / max(1, self.file_bytes)

    def table(self) -> str:
        rows = [f"{'site':32s} {'params':>9s} {'bits/param':>10s} {'codes':>9s} {'float':>9s} {'meta':>7s} {'bitmap':>8s}"
                f" {'varying':>8s}"]
        for s in self.sites:
            rows.append(f"{s.name:32s} {s.numel:9d} {s.bits_per_param:10.3f} {s.code_bits:9d} {s.float_bits:9d} "
                        f"{s.metadata_bits:7d} {s.bitmap_bits:8d} {s.varying_fraction:8.2%}")
        rows.append(f"total: {self.num_params} params, {self.bits_per_param:.3f} bits/param (float: 64), "
                    f"{self.file_bytes} bytes on disk vs {self.float_file_bytes} float ({self.compression:.2f}x)")
        rows.append(f"varying weights: {self.varying_fraction:.2%} over {VARYING_DRAWS} draws"
                    + (f"; effectively deterministic (< {DETERMINISTIC_THRESHOLD:.0%}): {', '.join(self.deterministic_sites)}"
                       if self.deterministic_sites else ""))
        rows.append(f"random numbers per draw: {self.normals_per_draw} Gaussian, {self.uniforms_per_draw} uniform"
                    + (" (stochastic rounding)" if self.uniforms_per_draw else ""))
        return "\n".join(rows)

    def codec_table(self) -> str:
        """Per site: the code streams' bits per parameter at fixed width, at their entropy, and in the file."""
        rows = [f"{'site':32s} {'params':>9s} {'fixed':>7s} {'entropy':>8s} {'actual':>7s}  (bits/param)"]
        for s in self.sites:
            rows.append(f"{s.name:32s} {s.numel:9d} {s.fixed_width_bits / s.numel:7.3f} "
                        f"{s.entropy_bits / s.numel:8.3f} {s.actual_bits / s.numel:7.3f}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _file_bytes(meta: dict, stream_bytes: dict) -> int:
    index = []
    offset = 0
    for name, (dtype, numel, nbytes) in stream_bytes.items():
        index.append({"name": name, "dtype": dtype, "shape": [numel], "offset": offset, "nbytes": nbytes})
        offset += nbytes
    header = json.dumps({"kind": KIND, "byteorder": "little", "meta": meta, "tensors": index}, separators=(",", ":"))
    return _FRAMING + len(header.encode()) + offset


def _stochastic_weights(guide, site: SiteMemory, sample) -> int:
    """How many of ``site``'s weights the sample quantizer rounds stochastically."""
    if sample is None or sample.rounding == "nearest":
        return 0
    with torch.no_grad():
        mask = sample.stochastic_mask(*guide.get_loc_scale(site.name))
    return site.numel if mask is None else int(mask.sum())


def memory_report(guide, *, codec: Optional[str] = None) -> MemoryReport:
    """Bits per parameter and bytes of ``guide`` (quantized or float), against its float version.

    The byte counts are those of :func:`~pyro_bq.io.save_packed`'s file written with ``codec``.
    Each site also reports its code streams three ways: ``fixed_width_bits``,
    ``entropy_bits`` (their empirical entropy) and ``actual_bits`` (what the file spends on them).
    The varying fractions come from :func:`~pyro_bq.guides.varying_fraction` with
    its default draws and seed (the global RNG is untouched).

    Usage::

        report = memory_report(quantize(guide, JQ(4)), codec="ans")
        print(report.bits_per_param, report.file_bytes, report.compression)
        print(report.codec_table())
    """
    meta, tensors, accounting = encode_guide(guide, codec)
    report = MemoryReport()
    for name, acc in accounting.items():
        report.sites.append(SiteMemory(name, acc["numel"], acc["code"], acc["float"], acc["metadata"], acc["bitmap"],
                                       fixed_width_bits=acc["code"] + acc["bitmap"], entropy_bits=acc["entropy"],
                                       actual_bits=acc["actual"]))
    report.num_params = sum(s.numel for s in report.sites)
    report.total_bits = sum(s.total_bits for s in report.sites)
    sizes = {k: (str(t.dtype).replace("torch.", ""), t.numel(), t.numel() * t.element_size()) for k, t in tensors.items()}
    report.payload_bytes = sum(v[2] for v in sizes.values())
    report.file_bytes = _file_bytes(meta, sizes)
    # the float guide: every loc and scale as float32
    float_meta = build_meta(guide.base if isinstance(guide, QuantizedGuide) else guide)
    n = report.num_params * 2
    float_sizes = {"codes": ("uint8", 0, 0), "f32": ("float32", n, 4 * n), "i16": ("int16", 0, 0), "bitmap": ("uint8", 0, 0)}
    report.float_payload_bytes = 4 * n
    report.float_file_bytes = _file_bytes(float_meta, float_sizes)
    fractions = varying_fraction(guide)
    quantizers = guide.quantizers if isinstance(guide, QuantizedGuide) else {}
    for site in report.sites:
        site.varying_fraction = fractions.get(site.name, 1.0)
        sample = getattr(quantizers.get(site.name), "sample", None)
        site.rounding = "float" if sample is None else sample.rounding
        site.stochastic_weights = _stochastic_weights(guide, site, sample)
    report.varying_fraction, report.deterministic_sites = deterministic_sites(
        fractions, {s.name: s.numel for s in report.sites if s.name in fractions})
    return report
