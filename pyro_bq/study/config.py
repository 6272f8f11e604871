"""Settings of the Dirty-MNIST study and the list of configurations it evaluates."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pyro_bq._validation import check_bool, check_float, check_int, resolve_device
from pyro_bq.data.ambiguous import DDU_NUM_IMAGES, AmbiguousConfig
from pyro_bq.io.container import writable_folder
from pyro_bq.quant.grids import MAX_BITS, check_bits

__all__ = [
    "StudyConfig",
    "RowSpec",
    "QUANT_POLICIES",
    "EXTRA_ROWS",
    "SR_POLICIES",
    "SR_ROUNDINGS",
    "ALL_POLICIES",
    "TRAINED_FAMILIES",
    "PWFN_SCHEDULE",
    "AMNIST_SIZES",
    "ROW_FORMAT",
    "DEFAULT_BITS",
    "BITS_RANGE",
    "check_out_dir",
    "file_sha256",
]

#: Post-hoc quantization policies evaluated at every bit width.
QUANT_POLICIES = ("vpq", "spq", "jq")
#: Rows evaluated once rather than per bit width: the log-quantized guide, PWFN and the allocators.
EXTRA_ROWS = ("logquant", "pwfn", "qi", "rb", "smol")
#: Post-hoc policies whose sampled weights are rounded stochastically, and the bit widths of
#: their rows (``spq2-sr``, ``jq3-sr``, ``jq2-sr``), listed after the round-to-nearest rows.
SR_POLICIES = {"spq-sr": (2,), "jq-sr": (3, 2)}
#: The stochastic rounding rules a ``-sr`` row may use (``sr_rounding``); see docs/stochastic_rounding.md.
SR_ROUNDINGS = ("stochastic-matched-or-nearest", "stochastic-matched", "stochastic")
#: Every name ``--policies`` accepts; each has a builder in :data:`pyro_bq.study.runner.ROW_BUILDERS`.
ALL_POLICIES = ("float",) + QUANT_POLICIES + tuple(SR_POLICIES) + EXTRA_ROWS
#: Row families that train beyond the shared float guide (on the training data): their rows are
#: labelled ``"trained"``; every other row (float, VPQ/SPQ/JQ, QI, RB, activation variants of
#: those) quantizes the float guide without more training and is labelled ``"data-free"``.
TRAINED_FAMILIES = ("logquant", "pwfn", "smol", "qat")
#: Fractions of the weights PWFN has fixed after each round of the study's PWFN row.
PWFN_SCHEDULE = (0.5, 0.8, 0.95, 1.0)
#: Named Ambiguous-MNIST sizes (unique train, test images): ``ddu`` is the published set's.
AMNIST_SIZES = {"ddu": DDU_NUM_IMAGES}
#: Version of what a row record holds; part of :meth:`StudyConfig.eval_fingerprint`, so rows
#: recorded by a version with other columns or other formulas are computed again.
ROW_FORMAT = 4
DEFAULT_BITS = (8, 6, 4, 3, 2)
#: Allowed weight and activation bit widths (those of :func:`pyro_bq.quant.check_bits`).
BITS_RANGE = (1, MAX_BITS)


def check_out_dir(name: str, path) -> Path:
    """Create ``path`` if needed and make sure it is a writable folder; raise ValueError otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} exists and is not a folder; choose a writable folder")
    return writable_folder(name, path)


def file_sha256(name: str, path) -> Optional[str]:
    """The SHA-256 of the file at ``path`` (hex), or None when there is no such file.

    Usage::

        file_sha256("checkpoint", "runs/study/train/abc/guide.bq")
    """
    try:
        with open(Path(path).expanduser(), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ValueError(f"{name} {os.fspath(path)!r} cannot be read ({err.strerror or err}); pass a readable file") from err


def _names(name: str, value) -> tuple:
    """``value`` as a tuple of policy names: one str, or a sequence of str."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a policy name or a sequence of them (from {', '.join(ALL_POLICIES)}), "
            f"got {type(value).__name__} ({value!r})"
        )
    items = tuple(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a policy name (str) from {', '.join(ALL_POLICIES)}, got {type(item).__name__} ({item!r})")
    return items


@dataclass(frozen=True)
class RowSpec:
    """One evaluated configuration: a guide family, its bits and the activation bits (or None)."""

    family: str
    bits: Optional[int] = None
    act_bits: Optional[int] = None
    #: a ``float`` row with this many SVI steps beyond the shared float guide: the
    #: matched-budget baseline of the trained rows with that many extra steps.
    steps: Optional[int] = None

    @property
    def training(self) -> str:
        """``"trained"`` for families in :data:`TRAINED_FAMILIES` and budget baselines, else ``"data-free"``."""
        return "trained" if self.family in TRAINED_FAMILIES or self.steps is not None else "data-free"

    @property
    def is_baseline(self) -> bool:
        """Whether this is a matched-budget float baseline (``float+N``)."""
        return self.steps is not None

    @property
    def name(self) -> str:
        if self.steps is not None:
            return f"{self.family}+{self.steps}"
        base = self.family if self.bits is None else f"{self.family}{self.bits}"
        if self.family in SR_POLICIES and self.bits is not None:
            base = f"{self.family.removesuffix('-sr')}{self.bits}-sr"
        return base if self.act_bits is None else f"{base}+act{self.act_bits}"


@dataclass(frozen=True)
class StudyConfig:
    """All settings of a study run; validated at construction.

    :param data_dir: data root with ``MNIST/raw`` and ``FashionMNIST/raw``.
    :param out_dir: where results, plots, checkpoints and caches go (created; must be writable).
    :param cache_dir: cache of the generated Ambiguous-MNIST (default ``out_dir/cache``).
    :param policies: families to evaluate, from :data:`ALL_POLICIES`; ``float`` is always evaluated.
    :param bits: bit widths of the post-hoc policies (each in 1..16).
    :param act_bits: bits of the activation-quantized variants (1..16).
    :param act_policies: families that also get an activation-quantized variant.
    :param sr_rounding: the rounding rule of the ``-sr`` rows: ``"stochastic-matched-or-nearest"``
        (the default: the variance-matched rule for the weights whose posterior variance it
        matches, round to nearest for the others; in the 3-seed measurement of
        docs/stochastic_rounding.md its AUROC(MI) was closer to float's than the matched rule's
        on all three rows), ``"stochastic-matched"`` (the
        variance-matched rule for every weight) or ``"stochastic"`` (plain unbiased stochastic rounding).
    :param ends_bits: VPQ/SPQ/JQ keep the first and the last layer at this many bits
        (a common convention; ``None``: every layer at the row's bits).
    :param num_epochs: SVI epochs over Dirty-MNIST; ``pretrain_epochs``: epochs of
        the deterministic LeNet-5 the guide starts from.
    :param num_samples: weight draws per evaluation; ``eval_limit`` rows per test set.
    :param mnist_limit: MNIST training rows (``None``: all 60,000).
    :param amnist_train_images, amnist_test_images: unique generated Ambiguous-MNIST images
        (the published set: :data:`AMNIST_SIZES` ``["ddu"]``, 6,000 each).
    :param amnist_noise: standard deviation of Gaussian noise added to every normalised
        image of the training and test sets (the published Dirty-MNIST reader uses 0.05,
        :data:`~pyro_bq.data.ambiguous.DDU_NOISE_STD`; default 0: none).
    :param ood_dir: a folder of extra OOD sets (:func:`pyro_bq.data.ood.load_ood_dir`): each
        gets its own AUROC columns; the fingerprints hold the SHA-256 of its files.
    :param checkpoint: optional trained guide (``guide.bq`` of an earlier run) to load instead of training;
        the fingerprints hold a SHA-256 of its contents, so a replaced file makes every row run again.
    :param threads: torch threads (``None``: the count torch has when the study starts). The count
        changes floating-point sums and so the results: it is part of the fingerprints (a study run
        with another count computes its rows again) and of the Ambiguous-MNIST cache key.
    :param device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``: where training and
        evaluation run. A GPU gives other floating-point sums than the CPU, so a run on CUDA has
        its own fingerprints; on the CPU the fingerprints are those of a config without a device.
    :param keep_going: a row that raises is recorded with its error text in the
        results and the other rows still run (default: the error stops the study).

    Usage::

        cfg = StudyConfig(data_dir="data", out_dir="runs/study", bits=(4, 3))
        results = run_study(cfg)
    """

    data_dir: Optional[str] = None
    out_dir: str = "dirty-mnist-study"
    cache_dir: Optional[str] = None
    seed: int = 0
    policies: tuple = ALL_POLICIES
    bits: tuple = DEFAULT_BITS
    act_bits: int = 8
    ends_bits: Optional[int] = 8
    sr_rounding: str = "stochastic-matched-or-nearest"
    act_policies: tuple = ("float", "jq", "logquant")
    num_epochs: int = 1
    pretrain_epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    scale_lr: Optional[float] = 1e-2
    init_scale: float = 1e-2
    prior_gain: float = 1.0
    num_samples: int = 50
    eval_limit: Optional[int] = 2000
    mnist_limit: Optional[int] = None
    amnist_train_images: int = 2000
    amnist_test_images: int = 500
    amnist_source: str = "auto"
    amnist_fit_size: int = 20000
    amnist_vae_epochs: int = 4
    amnist_noise: float = 0.0
    ood_dir: Optional[str] = None
    logquant_bits: int = 4
    logquant_steps: int = 300
    arviz_samples: int = 50
    arviz_limit: int = 500
    calib_rows: int = 512
    extra_steps: int = 200
    mixed_bits: float = 4.0
    checkpoint: Optional[str] = None
    threads: Optional[int] = None
    progress: bool = True
    keep_going: bool = False
    device: str = "auto"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        for name in ("data_dir", "cache_dir", "checkpoint", "ood_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got {type(value).__name__}")
            if value is not None:
                set_(name, os.fspath(value))
        if not isinstance(self.out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir must be a path (str or os.PathLike), got {type(self.out_dir).__name__}")
        set_("out_dir", os.fspath(self.out_dir))
        check_int("seed", self.seed, low=0)
        pol = tuple(p.strip().lower() for p in _names("policies", self.policies))
        for p in pol:
            if p not in ALL_POLICIES:
                raise ValueError(f"policies: unknown policy {p!r}; allowed: {', '.join(ALL_POLICIES)}")
        set_("policies", tuple(dict.fromkeys(("float",) + pol)))
        if isinstance(self.bits, numbers.Integral):
            bits = (self.bits,)
        elif isinstance(self.bits, (str, bytes)) or not isinstance(self.bits, Iterable):
            raise TypeError(
                f"bits must be an int or a sequence of ints in {BITS_RANGE[0]}..{BITS_RANGE[1]}, "
                f"got {type(self.bits).__name__} ({self.bits!r})"
            )
        else:
            bits = tuple(self.bits)
        if not bits:
            raise ValueError(f"bits must list at least one bit width in {BITS_RANGE[0]}..{BITS_RANGE[1]}")
        set_("bits", tuple(sorted({check_bits("bits", b) for b in bits}, reverse=True)))
        check_bits("act_bits", self.act_bits)
        if self.ends_bits is not None:
            check_bits("ends_bits", self.ends_bits)
        if self.sr_rounding not in SR_ROUNDINGS:
            raise ValueError(f"sr_rounding must be one of {', '.join(map(repr, SR_ROUNDINGS))}; got {self.sr_rounding!r}")
        ap = tuple(p.strip().lower() for p in _names("act_policies", self.act_policies))
        for p in ap:
            if p not in ALL_POLICIES:
                raise ValueError(f"act_policies: unknown policy {p!r}; allowed: {', '.join(ALL_POLICIES)}")
        set_("act_policies", ap)
        check_int("num_epochs", self.num_epochs, low=1)
        check_int("pretrain_epochs", self.pretrain_epochs, low=0)
        check_int("batch_size", self.batch_size, low=1)
        check_float("lr", self.lr, low=0.0, low_open=True)
        if self.scale_lr is not None:
            check_float("scale_lr", self.scale_lr, low=0.0, low_open=True)
        check_float("init_scale", self.init_scale, low=0.0, low_open=True)
        check_float("prior_gain", self.prior_gain, low=0.0, low_open=True)
        check_int("num_samples", self.num_samples, low=2)
        if self.eval_limit is not None:
            check_int("eval_limit", self.eval_limit, low=10)
        if self.mnist_limit is not None:
            check_int("mnist_limit", self.mnist_limit, low=1, high=60000)
        check_int("amnist_train_images", self.amnist_train_images, low=1)
        check_int("amnist_test_images", self.amnist_test_images, low=1)
        if self.amnist_source not in ("auto", "original", "generated"):
            raise ValueError(f"amnist_source must be one of 'auto', 'original', 'generated'; got {self.amnist_source!r}")
        check_int("amnist_fit_size", self.amnist_fit_size, low=10, high=60000)
        check_int("amnist_vae_epochs", self.amnist_vae_epochs, low=1)
        check_float("amnist_noise", self.amnist_noise, low=0.0, high=1.0)
        check_bits("logquant_bits", self.logquant_bits)
        check_int("logquant_steps", self.logquant_steps, low=1)
        check_int("arviz_samples", self.arviz_samples, low=1)
        check_int("arviz_limit", self.arviz_limit, low=1)
        check_int("calib_rows", self.calib_rows, low=1)
        check_int("extra_steps", self.extra_steps, low=1)
        check_float("mixed_bits", self.mixed_bits, low=2.0, high=8.0)
        if self.threads is not None:
            check_int("threads", self.threads, low=1)
        set_("progress", check_bool("progress", self.progress))
        set_("keep_going", check_bool("keep_going", self.keep_going))
        if not isinstance(self.device, str):
            raise TypeError(f"device must be 'auto', 'cpu' or 'cuda', got {type(self.device).__name__}")
        resolve_device(self.device)  # 'cuda' without a GPU: a ValueError that says so

    # -- derived -----------------------------------------------------------------------
    @property
    def out_path(self) -> Path:
        return Path(self.out_dir).expanduser()

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else self.out_path / "cache"

    def amnist_config(self) -> AmbiguousConfig:
        return AmbiguousConfig(
            seed=self.seed, num_train_images=self.amnist_train_images, num_test_images=self.amnist_test_images,
            vae_train_size=self.amnist_fit_size, ensemble_train_size=self.amnist_fit_size,
            vae_epochs=self.amnist_vae_epochs,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def torch_device(self) -> torch.device:
        """The device the run uses (``device`` resolved on this machine)."""
        return resolve_device(self.device)

    @property
    def num_threads(self) -> int:
        """The torch thread count of the run: ``threads``, or torch's current count."""
        return self.threads if self.threads is not None else torch.get_num_threads()

    def _digest(self, keys, extra: Optional[dict] = None) -> str:
        d = {**self.to_dict(), **(extra or {})}
        if "checkpoint" in keys and self.checkpoint is not None:
            d["checkpoint"] = file_sha256("checkpoint", self.checkpoint) or f"missing file {self.checkpoint}"
        d["threads"] = self.num_threads
        keys = tuple(keys) + tuple(extra or ())
        if "threads" in keys and self.torch_device.type != "cpu":  # a GPU run's numbers differ from the CPU's
            d["device"], keys = self.torch_device.type, keys + ("device",)
        return hashlib.sha256(json.dumps({k: d[k] for k in keys}, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def train_fingerprint(self) -> str:
        """Changes exactly when the trained float guide would change.

        It holds the contents of ``checkpoint`` (not its path) and the torch thread count.
        """
        return self._digest(
            ("seed", "num_epochs", "pretrain_epochs", "batch_size", "lr", "scale_lr", "init_scale", "prior_gain", "mnist_limit",
             "amnist_train_images", "amnist_test_images", "amnist_source", "amnist_fit_size", "amnist_vae_epochs",
             "amnist_noise", "checkpoint", "threads")
        )

    def eval_fingerprint(self) -> str:
        """Changes when any evaluated number of an existing row would change (also with :data:`ROW_FORMAT`)."""
        return self.train_fingerprint() + "-" + self._digest(
            ("num_samples", "eval_limit", "ends_bits", "sr_rounding", "logquant_bits", "logquant_steps", "arviz_samples", "arviz_limit", "calib_rows",
             "extra_steps", "mixed_bits"), extra={"row_format": ROW_FORMAT, "ood_sets": self._ood_digest()}
        )

    def _ood_digest(self) -> Optional[dict]:
        """``{relative path: SHA-256}`` of every file under ``ood_dir`` (``None`` without one)."""
        if self.ood_dir is None:
            return None
        root = Path(self.ood_dir).expanduser()
        if not root.is_dir():
            return {"missing folder": self.ood_dir}
        return {str(p.relative_to(root)): file_sha256("ood_dir file", p) for p in sorted(root.rglob("*")) if p.is_file()}

    def trained_steps(self, spec: RowSpec) -> Optional[int]:
        """SVI steps row ``spec`` trains beyond the shared float guide (``None``: a data-free row).

        The log-quantized guide trains ``logquant_steps``; PWFN ``extra_steps`` per round of
        :data:`PWFN_SCHEDULE`; SMOL ``extra_steps`` in each of its two phases.
        """
        if spec.steps is not None:
            return spec.steps
        return {"logquant": self.logquant_steps, "pwfn": len(PWFN_SCHEDULE) * self.extra_steps,
                "smol": 2 * self.extra_steps}.get(spec.family)

    def baseline_of(self, spec: RowSpec) -> Optional[RowSpec]:
        """The matched-budget baseline of a trained row: the float guide trained as many
        more SVI steps from the same start (``float+N``); ``None`` for data-free rows and baselines."""
        if spec.is_baseline or spec.training != "trained":
            return None
        steps = self.trained_steps(spec)
        return None if steps is None else RowSpec("float", steps=steps)

    def rows(self) -> list[RowSpec]:
        """The configurations to evaluate, in table order."""
        out = []

        def add(family, bits=None):
            out.append(RowSpec(family, bits))
            if family in self.act_policies:
                out.append(RowSpec(family, bits, self.act_bits))

        add("float")
        for fam in QUANT_POLICIES:
            if fam in self.policies:
                for b in self.bits:
                    add(fam, b)
        for fam, widths in SR_POLICIES.items():
            if fam in self.policies:
                for b in widths:
                    out.append(RowSpec(fam, b))
        if "logquant" in self.policies:
            add("logquant", self.logquant_bits)
        for fam in ("pwfn", "qi", "rb", "smol"):
            if fam in self.policies:
                add(fam)
        baselines = [b for b in map(self.baseline_of, out) if b is not None]
        return out + sorted(set(baselines), key=lambda b: b.steps)
