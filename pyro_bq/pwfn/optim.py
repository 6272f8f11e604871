"""SGD that steps a softplus-parameterised scale as if the scale itself were the parameter.

The authors of PWFN keep each weight's ``sigma`` as a plain parameter and
step it with SGD (clamped at ``2**-30`` where it is used). Our guides hold
``raw`` with ``sigma = softplus(raw)``, and SGD on ``raw`` moves ``sigma`` by
``sigmoid(raw)**2`` times the step SGD on ``sigma`` would take: for the
paper's initial scales (about ``2**-9``) that factor is about ``4e-6``, so the
scales hardly move in a paper-preset round. :class:`SigmaSGD` with
``sigma_space=True`` takes the gradient with respect to ``sigma``
(``grad_raw / sigmoid(raw)``), keeps the momentum buffer in ``sigma`` units,
takes the SGD step on ``sigma``, floors it at ``sigma_min`` and writes back
``raw = softplus^-1(sigma)``: the same step as SGD on ``sigma`` itself.

Readings of the authors' code: their ``sigma`` may step below ``2**-30``
(even below zero) and is clamped only in the forward pass, where the clamp
stops its gradient; we floor the stored ``sigma`` at ``sigma_min = 2**-30``
instead (the same forward pass, without a parameter stuck below the clamp).

Usage::

    opt = pyro.optim.PyroOptim(SigmaSGD, lambda name: {
        "lr": 1e-3, "momentum": 0.9, "sigma_space": name.endswith("scale_raw")})
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyro_bq._validation import check_float
from pyro_bq.guides.meanfield import softplus_inverse

__all__ = ["SigmaSGD", "SIGMA_MIN"]

SIGMA_MIN = 2.0**-30


class SigmaSGD(torch.optim.Optimizer):
    """SGD with momentum; with ``sigma_space`` it steps ``softplus(p)`` instead of ``p``.

    :param params: parameters (or parameter groups) to optimize.
    :param lr: learning rate (> 0).
    :param momentum: momentum in [0, 1) (torch's SGD rule, no dampening).
    :param sigma_space: the parameters hold ``softplus``-inverse scales; step the scales themselves.
    :param sigma_min: floor of the stepped scale (> 0; only with ``sigma_space``).

    Usage::

        opt = SigmaSGD([raw], lr=1e-3, momentum=0.9, sigma_space=True)
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, sigma_space: bool = False,
                 sigma_min: float = SIGMA_MIN):
        lr = check_float("lr", lr, low=0.0, low_open=True)
        momentum = check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
        sigma_min = check_float("sigma_min", sigma_min, low=0.0, low_open=True)
        if not isinstance(sigma_space, bool):
            raise TypeError(f"sigma_space must be a bool, got {type(sigma_space).__name__}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "sigma_space": sigma_space,
                                  "sigma_min": sigma_min})

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step on every parameter with a gradient (on ``softplus(p)`` under ``sigma_space``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, in_sigma = group["lr"], group["momentum"], group["sigma_space"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if in_sigma:  # d loss / d sigma = (d loss / d raw) / sigmoid(raw); a zero gradient stays zero
                    grad = torch.where(grad == 0, torch.zeros_like(grad), grad / torch.sigmoid(p))
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if momentum == 0:
                    buf = grad
                elif buf is None:
                    buf = state["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(momentum).add_(grad)
                if in_sigma:
                    moved = buf != 0
                    sigma = (F.softplus(p) - lr * buf).clamp_min(group["sigma_min"])
                    p.copy_(torch.where(moved, softplus_inverse(sigma), p))
                else:
                    p.add_(buf, alpha=-lr)
        return loss
