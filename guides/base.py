"""The base class of every pyro_bq guide: a Gaussian per latent weight site.

A subclass overrides one method, :meth:`AutoGaussianSites.get_loc_scale`, which
says how the guide gets the loc and scale of a site; it gets :meth:`forward`,
:meth:`median`, :meth:`quantiles`, vectorized sampling and ``Predictive``
support for free. A subclass that changes what a sample *is* (for example
quantizing each sampled weight) overrides :meth:`get_posterior` instead.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Iterable, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuide

__all__ = ["AutoGaussianSites", "SiteInfo"]


class SiteInfo(NamedTuple):
    """Shape information of one latent site."""

    shape: torch.Size
    event_dim: int
    offset: int  # start of the site in a flat vector of all sites
    numel: int


class AutoGaussianSites(AutoGuide):
    """Abstract AutoGuide with an independent Gaussian ``Normal(loc, scale)`` per site.

    Each site is sampled directly from a ``Normal(...).to_event(event_dim)`` at
    the site itself (no auxiliary or Delta sites), so ``TraceMeanField_ELBO``
    uses the closed-form KL against Normal priors.

    Only real-valued latent sites are supported: BNN weights. Sites are
    recorded in model order in :attr:`sites`.
    """

    def __init__(self, model, *, create_plates=None):
        super().__init__(model, create_plates=create_plates)
        self.sites: dict[str, SiteInfo] = {}

    # -- set-up -----------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        sites, offset = {}, 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = site["fn"]
            if fn.support.is_discrete:
                # an unobserved likelihood (the model was traced without y): not a weight
                continue
            support = fn.support
            while hasattr(support, "base_constraint"):  # independent, mixture, ...
                support = support.base_constraint
            if support is not constraints.real:
                raise ValueError(
                    f"{type(self).__name__} handles real-valued weight sites only; site {name!r} has "
                    f"support {fn.support}. Block it with poutine.block or use another guide for it."
                )
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(
                        f"site {name!r} is a local latent inside the subsampled plate {frame.name!r}; "
                        "this guide holds global weights only"
                    )
            shape = site["value"].shape
            sites[name] = SiteInfo(shape, fn.event_dim, offset, site["value"].numel())
            offset += site["value"].numel()
        if not sites:
            raise ValueError("the model has no latent sample sites: did you pass a model built with bq_priors?")
        self.sites = sites
        # Plates come from the guide's own sites only: an unobserved likelihood
        # (model traced without y) must not make the guide draw subsample indices.
        self._prototype_frames = {
            frame.name: frame
            for name in sites
            for frame in self.prototype_trace.nodes[name]["cond_indep_stack"]
            if frame.vectorized
        }
        self._setup_params(self.prototype_trace)

    def _setup_params(self, trace) -> None:
        """Create the guide's parameters once the sites are known (subclasses)."""

    def setup(self, *args, **kwargs) -> "AutoGaussianSites":
        """Trace the model with example inputs and create the parameters now.

        Needed before ``load_state_dict`` on a fresh guide. Returns ``self``.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self

    def _require_setup(self) -> None:
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__} has no parameters yet: call it once with example inputs, "
                "or guide.setup(x), first"
            )

    @property
    def num_params(self) -> int:
        """Number of weights (latent scalars) the guide covers."""
        return sum(info.numel for info in self.sites.values())

    def _check_site(self, name: str) -> SiteInfo:
        self._require_setup()
        if name not in self.sites:
            raise ValueError(f"unknown site {name!r}; the guide's sites are {list(self.sites)}")
        return self.sites[name]

    # -- the extension point ------------------------------------------------------
    def get_loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loc, scale)`` of site ``name``, each of the site's shape."""
        raise NotImplementedError

    def get_posterior(self, name: str) -> dist.TorchDistribution:
        """The distribution sampled at site ``name``: ``Normal(loc, scale)`` by default."""
        loc, scale = self.get_loc_scale(name)
        return dist.Normal(loc, scale, validate_args=False).to_event(self.sites[name].event_dim)

    # -- AutoGuide API --------------------------------------------------------------
    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name in self.sites:
            site = self.prototype_trace.nodes[name]
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, self.get_posterior(name))
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior median (= mean) of each site, keyed by site name."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {name: self.get_loc_scale(name)[0].detach().clone() for name in self.sites}

    @torch.no_grad()
    def quantiles(self, quantiles: Iterable[float], *args, **kwargs) -> dict[str, torch.Tensor]:
        """Marginal quantiles of each site: a tensor of shape ``(len(quantiles), *site_shape)``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        q = torch.as_tensor(list(quantiles) if not isinstance(quantiles, torch.Tensor) else quantiles)
        if q.dim() != 1 or q.numel() == 0 or not bool(((q > 0) & (q < 1)).all()):
            raise ValueError(f"quantiles must be a non-empty list of numbers in (0, 1), got {quantiles!r}")
        out = {}
        for name in self.sites:
            loc, scale = self.get_loc_scale(name)
            z = dist.Normal(0.0, 1.0).icdf(q.to(loc)).reshape((-1,) + (1,) * loc.dim())
            out[name] = (loc + scale * z).detach()
        return out

    @torch.no_grad()
    def sample_latents(self, num_samples: int) -> dict[str, torch.Tensor]:
        """``num_samples`` joint draws of every site in one vectorized pass.

        Returns a dict of tensors of shape ``(num_samples, *site_shape)``.
        The draws are exactly those the guide's sample sites would produce.
        """
        self._require_setup()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        return {name: self.get_posterior(name).rsample((num_samples,)) for name in self.sites}
