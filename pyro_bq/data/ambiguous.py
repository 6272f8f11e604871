"""Ambiguous-MNIST: the original release files, or an offline generator.

Ambiguous-MNIST (the ambiguous part of Dirty-MNIST, Mukhoti et al. 2021) holds
digit-like images whose label is genuinely uncertain: each image carries several
labels drawn from a predictive distribution spread over a few classes.

Two sources:

* the original release files ``amnist_samples.pt`` (images ``(N, 1, 28, 28)``
  in [0, 1]) and ``amnist_labels.pt`` (labels ``(N, K)``), read with
  ``torch.load(weights_only=True)``: each image is repeated once per label,
  the first 60,000 rows are the training split and the rest the test split;
* :func:`generate_ambiguous_mnist`, which rebuilds a set of the same kind from
  MNIST alone, following the published recipe: a small VAE is trained on MNIST;
  latents (random draws and barycentric mixtures of encodings of digits of
  different classes) are decoded; a small ensemble of deterministic LeNets scores
  each decoded image; ``labels_per_image`` labels are drawn from the
  ensemble's mean prediction; candidates whose drawn labels are unanimous are
  rejected; images whose ensemble members agree (low mutual information) on a
  spread-out prediction (high expected entropy) are kept, stratified over the
  predictive entropy, with per-class quotas (the class of an image is its most
  frequent drawn label) that keep every class within ``max_class_ratio`` of
  the balanced share.

Readings of the published set (Mukhoti et al. 2021 and its public reader):

* the published set has 6,000 training and 6,000 test images with 10 labels
  each; :data:`DDU_NUM_IMAGES` gives those sizes (``--amnist-size ddu`` in the
  study); the default sizes are smaller to keep the study fast;
* the published reader adds N(0, 0.05) noise to the normalised images of
  Dirty-MNIST (MNIST and Ambiguous-MNIST); here that noise is an option
  (``noise_std`` of :class:`~pyro_bq.data.dirty.DirtyMNIST` and
  :func:`~pyro_bq.data.dirty.dirty_mnist_test_sets`, :data:`DDU_NOISE_STD`),
  off by default so the images are the generated ones;
* the published set is made with a VAE and an ensemble far larger than the
  ones here; rejecting unanimous candidates and class quotas are this
  generator's own guarantees that every kept image is ambiguous and no class
  dominates.

The generated set is cached in a pickle-free container next to a JSON manifest
(seed, sizes, settings, checksums); it is rebuilt only when the manifest asked
for differs from the one on disk or the stored data fails its checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from pyro_bq._validation import check_float, check_int, check_probability
from pyro_bq.io.container import CorruptFileError, atomic_write_bytes, read_container, writable_folder, write_container
from pyro_bq.models.nets import LeNet5
from pyro_bq.uncertainty.decompose import decompose
from pyro_bq.uncertainty.metrics import accuracy

from .dataset import InMemoryDataset
from .mnist import MNIST_MEAN, MNIST_STD, load_mnist, resolve_root

__all__ = [
    "AmbiguousConfig",
    "GeneratedAmbiguousMNIST",
    "ORIGINAL_FILES",
    "generate_ambiguous_mnist",
    "load_ambiguous_mnist",
    "load_original_ambiguous_mnist",
    "find_original_ambiguous_mnist",
    "default_cache_dir",
    "save_image_grid",
    "quality_report",
    "write_quality_report",
    "DDU_NUM_IMAGES",
    "DDU_NOISE_STD",
]

#: File names of the original Ambiguous-MNIST release.
ORIGINAL_FILES = ("amnist_samples.pt", "amnist_labels.pt")
#: Rows of the flattened original set that form the training split.
ORIGINAL_TRAIN_ROWS = 60000
#: Unique training and test images of the published Ambiguous-MNIST.
DDU_NUM_IMAGES = (6000, 6000)
#: Standard deviation of the Gaussian noise the published reader adds to normalised images.
DDU_NOISE_STD = 0.05
_GENERATOR_VERSION = 2
_KIND = "ambiguous-mnist"

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------
# original release files
# ---------------------------------------------------------------------------
def find_original_ambiguous_mnist(root: Optional[PathLike] = None) -> Optional[Path]:
    """The folder holding the original release files under ``root``, or ``None``.

    Looked for: ``ROOT/AmbiguousMNIST/`` and ``ROOT/`` itself.
    """
    base = resolve_root(root)
    for folder in (base / "AmbiguousMNIST", base):
        if all((folder / name).is_file() for name in ORIGINAL_FILES):
            return folder
    return None


def load_original_ambiguous_mnist(
    folder: PathLike, train: bool = True, *, normalize: bool = True, train_rows: int = ORIGINAL_TRAIN_ROWS
) -> InMemoryDataset:
    """Read the original ``amnist_samples.pt`` / ``amnist_labels.pt`` release.

    :param folder: the folder with both files.
    :param train: the first ``train_rows`` flattened rows, or the rest.
    :param normalize: apply MNIST's ``(x - 0.1307) / 0.3081``.
    :raises FileNotFoundError: a file is missing.
    :raises ValueError: the files have the wrong shapes, types or value ranges.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__}")
    train_rows = check_int("train_rows", train_rows, low=1)
    folder = Path(folder).expanduser()
    paths = [folder / name for name in ORIGINAL_FILES]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"original Ambiguous-MNIST file {path} not found; the folder must hold {', '.join(ORIGINAL_FILES)}"
            )
    loaded = []
    for path in paths:
        try:
            loaded.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # pickle errors, truncated zip, ...
            raise ValueError(f"cannot read {path} as a tensor file (torch.load weights_only=True): {err}") from err
    samples, labels = loaded
    if not isinstance(samples, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"{paths[0].name} and {paths[1].name} must each hold one tensor, got "
            f"{type(samples).__name__} and {type(labels).__name__}"
        )
    if samples.dim() == 3:
        samples = samples.unsqueeze(1)
    if samples.dim() != 4 or tuple(samples.shape[1:]) != (1, 28, 28):
        raise ValueError(
            f"{paths[0].name} must have shape (N, 1, 28, 28) or (N, 28, 28), got {tuple(samples.shape)}"
        )
    if labels.dim() == 1:
        labels = labels.unsqueeze(1)
    if labels.dim() != 2 or labels.shape[0] != samples.shape[0]:
        raise ValueError(
            f"{paths[1].name} must have shape (N, K) with N = {samples.shape[0]} images "
            f"(K labels per image), got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{paths[1].name} must hold integer class labels, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"{paths[1].name} labels must lie in 0..9, got {int(labels.min())}..{int(labels.max())}")
    x = samples.float()
    if x.numel() and float(x.max()) > 1.5:  # stored as 0..255
        x = x / 255.0
    k = labels.shape[1]
    x = x.expand(-1, k, 28, 28).reshape(-1, 1, 28, 28)
    y = labels.reshape(-1).long()
    if x.shape[0] <= train_rows:
        raise ValueError(
            f"the original files hold {x.shape[0]} rows (images x labels), not more than train_rows={train_rows}; "
            "there is no test split"
        )
    part = slice(None, train_rows) if train else slice(train_rows, None)
    x, y = x[part].contiguous(), y[part].contiguous()
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    return InMemoryDataset(x, y, name=f"AmbiguousMNIST-{'train' if train else 'test'}")


# ---------------------------------------------------------------------------
# generator configuration
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AmbiguousConfig:
    """Settings of the Ambiguous-MNIST generator; every field is part of the manifest.

    :param seed: the generator is deterministic given this seed.
    :param num_train_images: unique training images (each gets ``labels_per_image`` rows).
    :param num_test_images: unique test images.
    :param labels_per_image: labels drawn per image from the ensemble's mean prediction.
    :param candidate_factor: decoded candidates per kept image.
    :param interpolation_fraction: share of candidates that mix encodings of
        different classes (the rest are random latents).
    :param latent_dim: VAE latent size.
    :param vae_train_size: MNIST images the VAE trains on; ``vae_epochs`` passes.
    :param ensemble_size: deterministic LeNets labelling the candidates.
    :param ensemble_train_size: MNIST images each LeNet trains on; ``ensemble_epochs`` passes.
    :param max_mi_quantile: keep candidates whose mutual information is at most this quantile.
    :param min_entropy_quantile: keep candidates whose expected entropy is at least this quantile.
    :param num_strata: entropy strata for the stratified selection.
    :param max_class_ratio: every class (an image's most frequent drawn label)
        holds between ``1/max_class_ratio`` and ``max_class_ratio`` times the
        balanced share ``n / 10`` of each split.

    Usage::

        cfg = AmbiguousConfig(seed=0, num_train_images=2000, num_test_images=500)
        gen = generate_ambiguous_mnist(root, cache_dir, cfg)
    """

    seed: int = 0
    num_train_images: int = 2000
    num_test_images: int = 500
    labels_per_image: int = 10
    candidate_factor: int = 8
    interpolation_fraction: float = 0.75
    latent_dim: int = 8
    vae_train_size: int = 20000
    vae_epochs: int = 4
    ensemble_size: int = 3
    ensemble_train_size: int = 20000
    ensemble_epochs: int = 1
    max_mi_quantile: float = 0.5
    min_entropy_quantile: float = 0.5
    num_strata: int = 10
    max_class_ratio: float = 2.0

    def __post_init__(self):
        check_int("seed", self.seed, low=0)
        check_int("num_train_images", self.num_train_images, low=1)
        check_int("num_test_images", self.num_test_images, low=1)
        check_int("labels_per_image", self.labels_per_image, low=2, high=100)
        check_int("candidate_factor", self.candidate_factor, low=1, high=1000)
        check_probability("interpolation_fraction", self.interpolation_fraction)
        check_int("latent_dim", self.latent_dim, low=1, high=256)
        check_int("vae_train_size", self.vae_train_size, low=10, high=60000)
        check_int("vae_epochs", self.vae_epochs, low=1)
        check_int("ensemble_size", self.ensemble_size, low=2, high=50)
        check_int("ensemble_train_size", self.ensemble_train_size, low=10, high=60000)
        check_int("ensemble_epochs", self.ensemble_epochs, low=1)
        check_float("max_mi_quantile", self.max_mi_quantile, low=0.0, high=1.0, low_open=True)
        check_float("min_entropy_quantile", self.min_entropy_quantile, low=0.0, high=1.0, high_open=True)
        check_int("num_strata", self.num_strata, low=1, high=1000)
        check_float("max_class_ratio", self.max_class_ratio, low=1.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# generator building blocks
# ---------------------------------------------------------------------------
class _VAE(nn.Module):
    """A small fully connected VAE on [0, 1] pixels with a Bernoulli decoder."""

    def __init__(self, latent_dim: int, hidden: int = 400):
        super().__init__()
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU())
        self.enc_mu = nn.Linear(hidden, latent_dim)
        self.enc_logvar = nn.Linear(hidden, latent_dim)
        self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 784))

    def encode(self, x):
        h = self.enc(x)
        return self.enc_mu(h), self.enc_logvar(h)

    def decode_logits(self, z):
        return self.dec(z)

    def decode(self, z):
        return torch.sigmoid(self.dec(z)).view(-1, 1, 28, 28)


def _train_vae(x01: torch.Tensor, cfg: AmbiguousConfig, gen: torch.Generator, bar) -> _VAE:
    vae = _VAE(cfg.latent_dim)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    flat = x01.reshape(len(x01), -1)
    for _ in range(cfg.vae_epochs):
        order = torch.randperm(len(flat), generator=gen)
        for start in range(0, len(flat), 128):
            xb = flat[order[start : start + 128]]
            mu, logvar = vae.encode(xb)
            z = mu + torch.randn(mu.shape, generator=gen) * (0.5 * logvar).exp()
            rec = F.binary_cross_entropy_with_logits(vae.decode_logits(z), xb, reduction="sum")
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = (rec + kl) / len(xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.update(1)
    return vae.eval()


def _train_ensemble(x: torch.Tensor, y: torch.Tensor, cfg: AmbiguousConfig, gen: torch.Generator, bar) -> list:
    members = []
    for _ in range(cfg.ensemble_size):
        net = LeNet5()  # initialised from the seeded global RNG (forked by the caller)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(cfg.ensemble_epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), 128):
                idx = order[start : start + 128]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        members.append(net.eval())
        bar.update(1)
    return members


@torch.no_grad()
def _ensemble_probs(members, x: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    """Member probabilities ``(K, N, 10)`` for normalised inputs ``x``."""
    out = []
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        out.append(torch.stack([m(xb).softmax(-1) for m in members]))
    return torch.cat(out, dim=1)


@torch.no_grad()
def _candidates(vae: _VAE, x01: torch.Tensor, y: torch.Tensor, n: int, cfg: AmbiguousConfig, gen: torch.Generator) -> torch.Tensor:
    """``n`` decoded candidate images in [0, 1]: random latents and cross-class mixtures."""
    n_mix = int(round(n * cfg.interpolation_fraction))
    n_rand = n - n_mix
    z_parts = []
    if n_rand:
        z_parts.append(torch.randn((n_rand, cfg.latent_dim), generator=gen))
    if n_mix:
        mu, _ = vae.encode(x01)
        # pairs (a, b) of digits of different classes; sometimes a third one of a third class
        a = torch.randint(len(x01), (n_mix,), generator=gen)
        shift = torch.randint(1, 10, (n_mix,), generator=gen)
        b = _pick_of_class(y, (y[a] + shift) % 10, gen)
        shift2 = torch.randint(1, 9, (n_mix,), generator=gen)
        c_cls = (y[a] + shift2) % 10
        c_cls = torch.where(c_cls == y[b], (c_cls + 1) % 10, c_cls)
        c_cls = torch.where(c_cls == y[a], (c_cls + 1) % 10, c_cls)
        c = _pick_of_class(y, c_cls, gen)
        use_third = (torch.rand((n_mix,), generator=gen) < 0.3).unsqueeze(-1)
        w = _dirichlet(n_mix, 3, gen)
        pair = w[:, :2] / w[:, :2].sum(-1, keepdim=True)
        w = torch.where(use_third, w, torch.cat([pair, torch.zeros_like(w[:, :1])], -1))
        z_parts.append(w[:, :1] * mu[a] + w[:, 1:2] * mu[b] + w[:, 2:3] * mu[c])
    z = torch.cat(z_parts)
    return torch.cat([vae.decode(zb) for zb in z.split(4096)])


def _dirichlet(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Flat Dirichlet draws through normalised exponentials (seeded by ``gen``)."""
    e = -torch.log(torch.rand((n, k), generator=gen).clamp_min(1e-12))
    return e / e.sum(-1, keepdim=True)


def _pick_of_class(y: torch.Tensor, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each requested class, the index of a random example of that class (vectorized)."""
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y, minlength=10)
    starts = torch.cumsum(counts, 0) - counts
    if bool((counts[classes] == 0).any()):
        raise ValueError("the MNIST subset used by the generator lacks a class; raise vae_train_size")
    offs = (torch.rand(classes.shape, generator=gen) * counts[classes]).long().clamp_max(counts[classes] - 1)
    return order[starts[classes] + offs]


def _stratified_select(
    entropy: torch.Tensor, admissible: torch.Tensor, score: torch.Tensor, n: int, strata: int, gen: torch.Generator
) -> torch.Tensor:
    """Pick ``n`` indices: equal shares from ``strata`` equal-width entropy bins of the
    admissible candidates; shortfalls are filled from the remaining admissible ones,
    then from the best-scoring inadmissible ones."""
    idx = torch.nonzero(admissible).squeeze(-1)
    chosen = torch.zeros(len(entropy), dtype=torch.bool)
    if len(idx):
        e = entropy[idx]
        lo, hi = float(e.min()), float(e.max())
        bins = ((e - lo) / max(hi - lo, 1e-12) * strata).long().clamp(0, strata - 1)
        rank = torch.rand(len(idx), generator=gen)  # random order inside each bin
        order = torch.argsort(bins.double() * 2 + rank.double())
        sorted_bins = bins[order]
        counts = torch.bincount(bins, minlength=strata)
        starts = torch.cumsum(counts, 0) - counts
        pos_in_bin = torch.arange(len(idx)) - starts[sorted_bins]
        per_bin = -(-n // strata)
        take = order[pos_in_bin < per_bin]
        # deterministic trimming when the bins hold more than n in total
        take = take[torch.argsort(torch.rand(len(take), generator=gen))][:n]
        chosen[idx[take]] = True
    short = n - int(chosen.sum())
    if short > 0:
        rest_adm = torch.nonzero(admissible & ~chosen).squeeze(-1)
        fill = rest_adm[torch.randperm(len(rest_adm), generator=gen)[:short]]
        chosen[fill] = True
        short = n - int(chosen.sum())
    if short > 0:
        rest = torch.nonzero(~chosen).squeeze(-1)
        fill = rest[torch.argsort(score[rest], descending=True)[:short]]
        chosen[fill] = True
    picked = torch.nonzero(chosen).squeeze(-1)
    return picked[torch.randperm(len(picked), generator=gen)]


def _class_quotas(available: torch.Tensor, n: int, ratio: float) -> torch.Tensor:
    """Images to take per class: ``n`` in all, as balanced as ``available`` allows,
    each between ``n / (10 ratio)`` and ``n ratio / 10``.

    :raises ValueError: the candidates cannot fill such quotas.
    """
    share = n / 10
    low, high = math.ceil(share / ratio - 1e-9), max(math.floor(share * ratio + 1e-9), 1)
    cap = torch.minimum(available, torch.full_like(available, high))
    quota = torch.minimum(cap, torch.full_like(available, n // 10) + (torch.arange(10) < n % 10).long())
    while int(quota.sum()) < n:
        room = cap - quota
        open_ = torch.nonzero(room > 0).squeeze(-1)
        if not len(open_):
            break
        step = -(-(n - int(quota.sum())) // len(open_))
        for c in open_.tolist():
            quota[c] += min(int(room[c]), step, n - int(quota.sum()))
    if int(quota.sum()) < n or bool((quota < low).any()):
        raise ValueError(
            f"the non-unanimous candidates per class ({available.tolist()}) cannot fill {n} images with every class "
            f"within a factor {ratio:g} of {share:g}; raise candidate_factor or max_class_ratio"
        )
    return quota


def _balanced_select(
    cls: torch.Tensor, eligible: torch.Tensor, entropy: torch.Tensor, admissible: torch.Tensor, score: torch.Tensor,
    n: int, cfg: AmbiguousConfig, gen: torch.Generator,
) -> torch.Tensor:
    """``n`` eligible candidate indices with class quotas (:func:`_class_quotas`), each
    class picked by :func:`_stratified_select` among its eligible candidates."""
    available = torch.bincount(cls[eligible], minlength=10)
    quota = _class_quotas(available, n, cfg.max_class_ratio)
    picked = []
    for c in range(10):
        if int(quota[c]) == 0:
            continue
        idx = torch.nonzero(eligible & (cls == c)).squeeze(-1)
        local = _stratified_select(entropy[idx], admissible[idx], score[idx], int(quota[c]), cfg.num_strata, gen)
        picked.append(idx[local])
    picked = torch.cat(picked)
    return picked[torch.randperm(len(picked), generator=gen)]


def _majority(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most frequent label (the lowest on ties) and whether the row is unanimous."""
    counts = F.one_hot(labels, 10).sum(1)
    return counts.argmax(-1), counts.max(-1).values == labels.shape[1]


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------
# the generated set
# ---------------------------------------------------------------------------
@dataclass
class GeneratedAmbiguousMNIST:
    """A generated Ambiguous-MNIST: unique images, their labels and the manifest.

    ``train_images`` / ``test_images`` are ``(N, 1, 28, 28)`` in [0, 1];
    ``train_labels`` / ``test_labels`` are ``(N, labels_per_image)`` int64.
    ``manifest`` holds the config, checksums and summary statistics
    (``stats['mean_entropy_ambiguous']``, ``stats['mean_entropy_mnist']``: mean
    predictive entropy of the labelling ensemble, in nats).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    manifest: dict
    path: Optional[Path] = None
    from_cache: bool = False

    def dataset(self, train: bool = True, *, normalize: bool = True) -> InMemoryDataset:
        """The flattened split: each image repeated once per label, as in the original release."""
        images, labels = (self.train_images, self.train_labels) if train else (self.test_images, self.test_labels)
        k = labels.shape[1]
        x = images.expand(-1, k, 28, 28).reshape(-1, 1, 28, 28).contiguous()
        if normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        return InMemoryDataset(x, labels.reshape(-1).clone(), name=f"AmbiguousMNIST-{'train' if train else 'test'}")

    @property
    def stats(self) -> dict:
        return self.manifest.get("stats", {})


def default_cache_dir() -> Path:
    """``$PYRO_BQ_CACHE/ambiguous_mnist`` or ``~/.cache/pyro_bq/ambiguous_mnist``."""
    env = os.environ.get("PYRO_BQ_CACHE")
    if env:
        return Path(env).expanduser() / "ambiguous_mnist"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pyro_bq" / "ambiguous_mnist"


def _cache_key(cfg: AmbiguousConfig) -> dict:
    """What a cached generated set must match: the generator version, ``cfg`` and the torch thread count.

    The thread count changes floating-point sums in the VAE and ensemble
    training, and so the generated images: a set made with another count is
    made again rather than reused.
    """
    return {"kind": _KIND, "generator_version": _GENERATOR_VERSION, "config": cfg.to_dict(),
            "threads": torch.get_num_threads()}


def _cache_paths(cache_dir: Path, cfg: AmbiguousConfig) -> tuple[Path, Path]:
    key = hashlib.sha256(json.dumps(_cache_key(cfg), sort_keys=True).encode()).hexdigest()[:12]
    stem = f"amnist-gen-s{cfg.seed}-{key}"
    return cache_dir / f"{stem}.bq", cache_dir / f"{stem}.manifest.json"


def _try_cache(data_path: Path, manifest_path: Path, cfg: AmbiguousConfig) -> Optional[GeneratedAmbiguousMNIST]:
    if not (data_path.is_file() and manifest_path.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        meta, tensors = read_container(data_path, _KIND)
    except (OSError, ValueError, CorruptFileError):
        return None
    wanted = _cache_key(cfg)
    if any(manifest.get(k) != v for k, v in wanted.items()) or meta.get("manifest") != manifest:
        return None
    names = ("train_images", "train_labels", "test_images", "test_labels")
    if any(n not in tensors for n in names):
        return None
    if any(manifest.get("checksums", {}).get(n) != _sha256(tensors[n]) for n in names):
        return None
    return GeneratedAmbiguousMNIST(
        *(tensors[n] for n in names), manifest=manifest, path=data_path, from_cache=True
    )


def generate_ambiguous_mnist(
    root: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    config: Optional[AmbiguousConfig] = None,
    *,
    progress: bool = True,
    force: bool = False,
) -> GeneratedAmbiguousMNIST:
    """Generate (or load from the cache) an Ambiguous-MNIST from MNIST alone.

    :param root: MNIST data root (see :func:`~pyro_bq.data.resolve_root`).
    :param cache_dir: where the generated set and its manifest go; default
        :func:`default_cache_dir`. ``None`` together with ``force`` still caches.
    :param config: an :class:`AmbiguousConfig` (default settings when ``None``).
    :param progress: show a progress bar while generating.
    :param force: regenerate even when a valid cache exists.
    :raises ValueError: ``cache_dir`` cannot be created or written.

    The cache is keyed by ``config``, the generator version and the torch
    thread count (:func:`torch.get_num_threads`): other threads give other
    floating-point sums, so a set generated with another count is not reused.

    Usage::

        gen = generate_ambiguous_mnist("data", "cache", AmbiguousConfig(num_train_images=600))
        train = gen.dataset(train=True)          # 6,000 rows: 600 images x 10 labels
    """
    cfg = AmbiguousConfig() if config is None else config
    if not isinstance(cfg, AmbiguousConfig):
        raise TypeError(f"config must be an AmbiguousConfig or None, got {type(cfg).__name__}")
    cache = default_cache_dir() if cache_dir is None else cache_dir
    if not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path (str or os.PathLike) or None, got {type(cache).__name__}")
    cache = writable_folder("cache_dir", Path(cache).expanduser())
    data_path, manifest_path = _cache_paths(cache, cfg)
    if not force:
        hit = _try_cache(data_path, manifest_path, cfg)
        if hit is not None:
            return hit

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        result = _generate(root, cfg, progress)
    names = ("train_images", "train_labels", "test_images", "test_labels")
    tensors = dict(zip(names, result[:4]))
    manifest = {**_cache_key(cfg), "checksums": {n: _sha256(t) for n, t in tensors.items()}, "stats": result[4]}
    write_container(data_path, _KIND, {"manifest": manifest}, tensors)
    atomic_write_bytes(manifest_path, [json.dumps(manifest, indent=2, sort_keys=True).encode()])
    return GeneratedAmbiguousMNIST(*result[:4], manifest=manifest, path=data_path, from_cache=False)


#: Rounds of class-directed candidates drawn for classes the first candidates leave short.
_TOP_UP_ROUNDS = 8


def _score_candidates(members, cand: torch.Tensor, cfg: AmbiguousConfig, gen: torch.Generator):
    """The ensemble's uncertainty on ``cand`` and ``labels_per_image`` labels drawn from its mean prediction."""
    unc = decompose(_ensemble_probs(members, (cand - MNIST_MEAN) / MNIST_STD))
    labels = torch.multinomial(unc["mean_probs"], cfg.labels_per_image, replacement=True, generator=gen)
    return unc, labels


@torch.no_grad()
def _directed_candidates(vae: _VAE, x01: torch.Tensor, y: torch.Tensor, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One decoded mixture per entry of ``classes``: a digit of that class weighted 0.45-0.8 and a digit of another."""
    mu, _ = vae.encode(x01)
    a = _pick_of_class(y, classes, gen)
    b = _pick_of_class(y, (classes + torch.randint(1, 10, classes.shape, generator=gen)) % 10, gen)
    w = 0.45 + 0.35 * torch.rand((len(classes), 1), generator=gen)
    return vae.decode(w * mu[a] + (1 - w) * mu[b])


def _label_pool(vae, members, cand, fit_x, fit_y, n_keep: int, cfg: AmbiguousConfig, gen: torch.Generator):
    """Score ``cand``; while a class has fewer non-unanimous candidates than twice its
    balanced share, add mixtures directed at the short classes (at most
    :data:`_TOP_UP_ROUNDS` rounds). Returns the candidates, their uncertainty and labels."""
    unc, labels = _score_candidates(members, cand, cfg, gen)
    need = 2 * -(-n_keep // 10)
    for _ in range(_TOP_UP_ROUNDS):
        cls, unanimous = _majority(labels)
        have = torch.bincount(cls[~unanimous], minlength=10)
        short = torch.nonzero(have < need).squeeze(-1)
        if not len(short):
            break
        classes = short.repeat_interleave(need * cfg.candidate_factor // 2)
        extra = _directed_candidates(vae, fit_x, fit_y, classes, gen)
        extra_unc, extra_labels = _score_candidates(members, extra, cfg, gen)
        cand = torch.cat([cand, extra])
        unc = {k: torch.cat([unc[k], extra_unc[k]]) for k in ("total", "aleatoric", "epistemic", "mean_probs")}
        labels = torch.cat([labels, extra_labels])
    return cand, unc, labels


def _generate(root, cfg: AmbiguousConfig, progress: bool):
    gen = torch.Generator().manual_seed(cfg.seed)
    n_keep = cfg.num_train_images + cfg.num_test_images
    n_cand = n_keep * cfg.candidate_factor
    n_train = max(cfg.vae_train_size, cfg.ensemble_train_size)
    mnist = load_mnist(root, train=True, normalize=False, limit=None)
    pick = torch.randperm(len(mnist), generator=gen)[:n_train]
    x01, y = mnist.x[pick], mnist.y[pick]
    xn = (x01 - MNIST_MEAN) / MNIST_STD
    bar = tqdm(
        total=cfg.vae_epochs + cfg.ensemble_size + 2,
        desc="Ambiguous-MNIST",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    try:
        bar.set_postfix(stage="VAE")
        vae = _train_vae(x01[: cfg.vae_train_size], cfg, gen, bar)
        bar.set_postfix(stage="ensemble")
        members = _train_ensemble(xn[: cfg.ensemble_train_size], y[: cfg.ensemble_train_size], cfg, gen, bar)
        bar.set_postfix(stage="decode")
        fit_x, fit_y = x01[: cfg.vae_train_size], y[: cfg.vae_train_size]
        cand = _candidates(vae, fit_x, fit_y, n_cand, cfg, gen)
        bar.update(1)
        bar.set_postfix(stage="label")
        cand, unc, cand_labels = _label_pool(vae, members, cand, fit_x, fit_y, n_keep, cfg, gen)
        admissible = (unc["epistemic"] <= torch.quantile(unc["epistemic"], cfg.max_mi_quantile)) & (
            unc["aleatoric"] >= torch.quantile(unc["aleatoric"], cfg.min_entropy_quantile)
        )
        score = unc["aleatoric"] - 2.0 * unc["epistemic"]
        cls, unanimous = _majority(cand_labels)
        eligible = ~unanimous
        train_keep = _balanced_select(cls, eligible, unc["total"], admissible, score, cfg.num_train_images, cfg, gen)
        eligible[train_keep] = False
        test_keep = _balanced_select(cls, eligible, unc["total"], admissible, score, cfg.num_test_images, cfg, gen)
        keep = torch.cat([train_keep, test_keep])
        images, labels = cand[keep].contiguous(), cand_labels[keep].contiguous()
        # the reference: the same ensemble on real MNIST test digits
        mnist_test = load_mnist(root, train=False, normalize=True, limit=2000)
        ref = decompose(_ensemble_probs(members, mnist_test.x))
        bar.update(1)
    finally:
        bar.close()
    nt = cfg.num_train_images
    stats = {
        "mean_entropy_ambiguous": float(unc["total"][keep].mean()),
        "mean_expected_entropy_ambiguous": float(unc["aleatoric"][keep].mean()),
        "mean_mutual_information_ambiguous": float(unc["epistemic"][keep].mean()),
        "mean_entropy_mnist": float(ref["total"].mean()),
        "mean_expected_entropy_mnist": float(ref["aleatoric"].mean()),
        "mean_mutual_information_mnist": float(ref["epistemic"].mean()),
        "ensemble_accuracy_mnist_test": accuracy(ref["mean_probs"], mnist_test.y),
        "num_candidates": int(len(cand)),
        "num_admissible": int(admissible.sum()),
        "fraction_unanimous_candidates": float(unanimous.float().mean()),
        "fraction_unanimous": float(_majority(labels)[1].float().mean()),
        "class_histogram_train": torch.bincount(cls[train_keep], minlength=10).tolist(),
        "class_histogram_test": torch.bincount(cls[test_keep], minlength=10).tolist(),
    }
    return images[:nt], labels[:nt], images[nt:], labels[nt:], stats


def load_ambiguous_mnist(
    root: Optional[PathLike] = None,
    train: bool = True,
    *,
    cache_dir: Optional[PathLike] = None,
    source: str = "auto",
    config: Optional[AmbiguousConfig] = None,
    normalize: bool = True,
    progress: bool = True,
) -> InMemoryDataset:
    """Ambiguous-MNIST as an :class:`InMemoryDataset` (one row per image and label).

    :param root: data root; original files are looked for in ``ROOT/AmbiguousMNIST/``
        and ``ROOT/``, MNIST (for the generator) in ``ROOT/MNIST/raw/``.
    :param train: training or test split.
    :param cache_dir: cache of the generated set (see :func:`generate_ambiguous_mnist`).
    :param source: ``"auto"`` (original files when present, else generated),
        ``"original"`` or ``"generated"``.
    :param config: generator settings.
    :param normalize: apply MNIST's normalisation.

    Usage::

        amnist_test = load_ambiguous_mnist("data", train=False, cache_dir="cache")
    """
    if source not in ("auto", "original", "generated"):
        raise ValueError(f"source must be one of 'auto', 'original', 'generated'; got {source!r}")
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__}")
    if source in ("auto", "original"):
        folder = find_original_ambiguous_mnist(root)
        if folder is not None:
            return load_original_ambiguous_mnist(folder, train, normalize=normalize)
        if source == "original":
            raise FileNotFoundError(
                f"original Ambiguous-MNIST files ({', '.join(ORIGINAL_FILES)}) not found under "
                f"{resolve_root(root) / 'AmbiguousMNIST'} or {resolve_root(root)}"
            )
    gen = generate_ambiguous_mnist(root, cache_dir, config, progress=progress)
    return gen.dataset(train, normalize=normalize)


def save_image_grid(images: torch.Tensor, path: PathLike, *, nrow: int = 16, labels: Optional[torch.Tensor] = None, title: Optional[str] = None) -> Path:
    """Save images ``(N, 1, 28, 28)`` in [0, 1] as one PNG grid (written atomically).

    With ``labels`` ``(N, K)``, each tile is captioned with its label counts' top classes.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must be a tensor of shape (N, 1, 28, 28), got {getattr(images, 'shape', images)!r}")
    nrow = check_int("nrow", nrow, low=1)
    n = images.shape[0]
    ncol = nrow
    nrows = -(-n // ncol)
    fig = Figure(figsize=(ncol * 0.9, nrows * (1.05 if labels is not None else 0.9)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncol, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        if labels is not None:
            counts = torch.bincount(labels[i].long(), minlength=10)
            top = torch.argsort(counts, descending=True)[:2]
            ax.set_title(" ".join(f"{int(c)}:{int(counts[c])}" for c in top if counts[c] > 0), fontsize=6, pad=1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1.0 - (0.5 / (nrows + 1) if title else 0.0)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path = Path(path)
    atomic_write_bytes(path, [buf.getvalue()])
    return path


def quality_report(gen: GeneratedAmbiguousMNIST) -> dict:
    """How ambiguous a generated set is, from its manifest and labels.

    Returns the labelling ensemble's mean predictive entropy and mutual
    information on the set and on MNIST test digits (nats) with their ratios,
    the fraction of images whose drawn labels are unanimous, and each split's
    class histogram (class: an image's most frequent drawn label) with its
    largest and smallest count over the balanced share.

    Usage::

        report = quality_report(generate_ambiguous_mnist("data", "cache"))
        assert report["fraction_unanimous"] == 0.0
    """
    if not isinstance(gen, GeneratedAmbiguousMNIST):
        raise TypeError(f"gen must be a GeneratedAmbiguousMNIST, got {type(gen).__name__}")
    s = gen.stats
    out = {k: s[k] for k in ("mean_entropy_ambiguous", "mean_entropy_mnist", "mean_mutual_information_ambiguous",
                             "mean_mutual_information_mnist", "ensemble_accuracy_mnist_test") if k in s}
    if "mean_entropy_mnist" in s:
        out["entropy_ratio"] = s["mean_entropy_ambiguous"] / max(s["mean_entropy_mnist"], 1e-12)
    labels = torch.cat([gen.train_labels, gen.test_labels])
    out["fraction_unanimous"] = float(_majority(labels)[1].float().mean())
    for split, lab in (("train", gen.train_labels), ("test", gen.test_labels)):
        hist = torch.bincount(_majority(lab)[0], minlength=10)
        share = len(lab) / 10
        out[f"class_histogram_{split}"] = hist.tolist()
        out[f"class_share_range_{split}"] = [float(hist.min()) / share, float(hist.max()) / share]
    out["num_images"] = [len(gen.train_labels), len(gen.test_labels)]
    return out


def write_quality_report(gen: GeneratedAmbiguousMNIST, folder: PathLike, *, pages: int = 128) -> dict:
    """Write :func:`quality_report` (``ambiguous_quality.json``) and a sample page
    (``ambiguous_mnist_samples.png``: the first ``pages`` training images captioned
    with their top drawn labels) into ``folder``; returns ``{name: path}``.

    Usage::

        files = write_quality_report(gen, "runs/study")
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    pages = check_int("pages", pages, low=1)
    folder = writable_folder("folder", Path(folder).expanduser())
    report = quality_report(gen)
    report_path = folder / "ambiguous_quality.json"
    atomic_write_bytes(report_path, [json.dumps(report, indent=2).encode()])
    grid = save_image_grid(gen.train_images[:pages], folder / "ambiguous_mnist_samples.png",
                           labels=gen.train_labels[:pages],
                           title="generated Ambiguous-MNIST (captions: top-2 drawn labels: count)")
    return {"ambiguous_quality": str(report_path), "ambiguous_grid": str(grid)}
