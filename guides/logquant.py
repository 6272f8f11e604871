"""A mean-field Normal guide whose scales live on a log2 grid during training."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from pyro_bq._validation import check_int
from pyro_bq.quant.grids import check_bits, log2_exponents, log2_top, log2_window, ste
from pyro_bq.quant.quantizers import Log2Quantizer

from .meanfield import AutoMeanFieldNormal

__all__ = ["AutoLogQuantNormal"]


class AutoLogQuantNormal(AutoMeanFieldNormal):
    """Mean-field Normal guide with log2-parameterised scales kept on a ``bits``-bit power-of-two grid.

    Each weight has a float ``loc`` and a float exponent ``log2_scale``; the
    scale the guide uses is ``2**e`` where ``e`` is ``log2_scale`` rounded to
    an integer and clamped to the site's window of ``2**bits`` exponents,
    ``[top - 2**bits + 1, top]``: the grid of :class:`~pyro_bq.quant.Log2Quantizer`
    (:func:`~pyro_bq.quant.grids.log2_window`, :func:`~pyro_bq.quant.grids.log2_exponents`).
    ``top`` follows the largest (rounded) exponent of the site during training,
    or is fixed with ``window_top``. Rounding uses a straight-through estimator, so SVI trains the exponents
    as usual while every forward pass already sees quantized scales: no
    post-hoc step is needed for them (:func:`pyro_bq.guides.quantize` reuses
    this grid when the policy's scale bits equal ``bits``).

    :param bits: bits of each scale code, an int from 1 to 16.
    :param window_top: fixed top exponent of every site's window (default: follow the largest scale).
    Other arguments as in :class:`AutoMeanFieldNormal`.

    Usage::

        guide = AutoLogQuantNormal(model, bits=4, init_scale=1e-3)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    """

    def __init__(
        self,
        model,
        *,
        bits: int = 4,
        init_loc_fn: Optional[Callable[[dict], torch.Tensor]] = None,
        init_scale: float = 1e-2,
        window_top: Optional[int] = None,
        create_plates=None,
    ):
        self.bits = check_bits("bits", bits)
        self.window_top = None if window_top is None else check_int("window_top", window_top, low=-140, high=127)
        super().__init__(model, init_loc_fn=init_loc_fn, init_scale=init_scale, create_plates=create_plates)

    def _setup_params(self, trace) -> None:
        loc, scale = self._initial_flat(trace)
        self.loc = nn.Parameter(loc)
        self.log2_scale = nn.Parameter(torch.log2(scale.clamp_min(1e-30)))

    def _exponents(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``name``'s float exponents and its window's top (the rounded largest one, or ``window_top``)."""
        info = self._check_site(name)
        e = self.log2_scale[info.offset : info.offset + info.numel].view(info.shape)
        if self.window_top is None:
            return e, log2_top(e.detach().max())
        return e, torch.tensor(float(self.window_top), dtype=e.dtype, device=e.device)

    def exponents(self, name: str) -> torch.Tensor:
        """The integer exponents (as floats) of site ``name``'s scales."""
        e, top = self._exponents(name)
        return log2_exponents(e.detach(), *log2_window(top, self.bits))

    def flat_loc_scale(self):
        return self.loc, torch.cat([self.get_loc_scale(n)[1].reshape(-1) for n in self.sites])

    def get_loc_scale(self, name):
        info = self._check_site(name)
        e, top = self._exponents(name)
        e_q = ste(e, log2_exponents(e.detach(), *log2_window(top, self.bits)))
        return self.loc[info.offset : info.offset + info.numel].view(info.shape), torch.exp2(e_q)

    def scale_quantizer(self, name: str) -> Log2Quantizer:
        """A calibrated :class:`~pyro_bq.quant.Log2Quantizer` whose grid is this site's scale grid."""
        info = self._check_site(name)
        top = self._exponents(name)[1].detach().reshape([1] * len(info.shape)).to(torch.int16)
        return Log2Quantizer(self.bits, per_channel=False).load_state({"top": top}, info.shape)
