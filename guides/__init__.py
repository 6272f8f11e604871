"""Guides (installed as ``pyro_bq.guides``)."""

from .base import AutoGaussianSites, SiteInfo
from .meanfield import AutoMeanFieldNormal, init_to_pretrained, softplus_inverse

__all__ = ["AutoGaussianSites", "SiteInfo", "AutoMeanFieldNormal", "init_to_pretrained", "softplus_inverse"]
