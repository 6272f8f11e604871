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

from pyro_bq._rng import normal_rows, standard_normal
from pyro_bq._validation import check_schedule
from pyro_bq.distributions import FlatDraw, FusedNormal

__all__ = ["AutoGaussianSites", "SiteInfo"]


def _check_quantiles(quantiles) -> torch.Tensor:
    """``quantiles`` as a 1-D tensor of levels in (0, 1); raises naming ``quantiles`` otherwise."""
    allowed = "a non-empty list of numbers in (0, 1), e.g. [0.05, 0.5, 0.95]"
    if isinstance(quantiles, torch.Tensor):
        if quantiles.dim() != 1 or not quantiles.is_floating_point():
            raise TypeError(f"quantiles must be {allowed} or a 1-D floating-point tensor, got a tensor of "
                            f"shape {tuple(quantiles.shape)} and dtype {quantiles.dtype}")
        q = quantiles.detach()
    else:
        levels = check_schedule("quantiles", quantiles)  # a sequence of finite real numbers
        q = torch.tensor(levels, dtype=torch.get_default_dtype())
    if q.numel() == 0 or not bool(((q > 0) & (q < 1)).all()):
        shown = q.tolist() if q.numel() <= 8 else f"{q.numel()} values in [{q.min().item()}, {q.max().item()}]"
        raise ValueError(f"quantiles must be {allowed}; got {shown}")
    return q


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

    def fused_loc_scale(self):
        """Two 1-D vectors ``(loc, scale)`` of all sites in site order when every site samples a
        plain ``Normal`` whose loc and scale are their pieces at the offsets of :attr:`sites`,
        else ``None``. Then the guide draws all sites in one operation, and a file writer can
        store the vectors as they are. A subclass with one flat layout overrides it.

        Usage::

            fused = guide.fused_loc_scale()  # (loc, scale), each of guide.num_params values, or None
        """
        return None

    def _fused_draw(self):
        """``(loc, scale, value, eps)``: one draw of all sites as flat vectors
        (``value = loc + scale * eps``), or ``None`` where :meth:`fused_loc_scale` is."""
        fused = self.fused_loc_scale()
        if fused is None:
            return None
        loc, scale = fused
        eps = standard_normal(loc.shape, dtype=loc.dtype, device=loc.device)
        return loc, scale, torch.addcmul(loc, scale, eps), eps

    def _needs_plates(self) -> bool:
        return self.create_plates is not None or any(
            frame.vectorized for name in self.sites for frame in self.prototype_trace.nodes[name]["cond_indep_stack"])

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
        self.setup(*args, **kwargs)
        needed = self.__dict__.get("_plates_needed")
        if needed is None:
            needed = self.__dict__["_plates_needed"] = self._needs_plates()
        if not needed:
            # every site is global: no plate to enter (and no subsample to draw)
            draw = self._fused_draw()
            if draw is not None:
                return self._forward_fused(*draw)
            return {name: pyro.sample(name, self.get_posterior(name)) for name in self.sites}
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

    def _split(self, flat: torch.Tensor) -> list:
        """Views of a flat vector (last dim) per site, shaped like the sites."""
        lead = flat.shape[:-1]
        chunks = flat.split([info.numel for info in self.sites.values()], dim=-1)
        return [c.view(lead + info.shape) for c, info in zip(chunks, self.sites.values())]

    def _forward_fused(self, loc, scale, value, eps) -> dict[str, torch.Tensor]:
        result, flat = {}, FlatDraw(loc, scale)
        parts = zip(self.sites.items(), self._split(loc), self._split(scale), self._split(value), self._split(eps))
        for (name, info), loc_i, scale_i, value_i, eps_i in parts:
            fn = FusedNormal(loc_i, scale_i, value_i, eps_i, flat, info.offset).to_event(info.event_dim)
            result[name] = pyro.sample(name, fn)
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior median (= mean) of each site, keyed by site name."""
        self.setup(*args, **kwargs)
        return {name: self.get_loc_scale(name)[0].detach().clone() for name in self.sites}

    @torch.no_grad()
    def quantiles(self, quantiles: Iterable[float], *args, **kwargs) -> dict[str, torch.Tensor]:
        """Marginal quantiles of each site: a tensor of shape ``(len(quantiles), *site_shape)``.

        :param quantiles: a non-empty list (or 1-D floating-point tensor) of levels in the open interval (0, 1).
        :raises TypeError: for a scalar, a str or non-numeric entries.
        :raises ValueError: for an empty list or levels outside (0, 1) (NaN included).
        """
        q = _check_quantiles(quantiles)
        self.setup(*args, **kwargs)
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
        fused = self.fused_loc_scale()
        if fused is not None:
            loc, scale = fused
            flat = normal_rows(loc, scale, num_samples)  # row r: the guide's r-th draw from here
            return dict(zip(self.sites, self._split(flat)))
        return {name: self.get_posterior(name).rsample((num_samples,)) for name in self.sites}
