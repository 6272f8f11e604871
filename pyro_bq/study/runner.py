"""The Dirty-MNIST study: train (or load) a BNN, quantize it many ways, evaluate every way.

Steps, each resumable:

1. data: Dirty-MNIST training set (MNIST + generated or original Ambiguous-MNIST)
   and the three test sets;
2. a deterministic LeNet-5 (:func:`pyro_bq.recipes.pretrain`, ``pretrain_epochs``),
   then a mean-field Normal guide started from it and trained with SVI
   (:func:`pyro_bq.recipes.fit_meanfield_bnn`; checkpoints every 200 steps, resumed);
3. one row per configuration (:meth:`StudyConfig.rows`): the row's builder in
   :data:`ROW_BUILDERS` makes its guide (float, VPQ/SPQ/JQ at each bit width,
   the log-quantized guide, PWFN, the mixed-precision allocators), optionally
   evaluated with quantized activations, on MNIST, Ambiguous-MNIST and
   Fashion-MNIST with the same weight-draw seed; its record, scores and an
   ArviZ InferenceData are written, and a finished row is skipped on a re-run;
4. the results table (Markdown, CSV, JSON) and the plots.

A row that raises stops the study. With ``keep_going`` the error text of the
row goes into the results in place of its numbers, and the other rows run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from pyro_bq.data.ambiguous import (
    find_original_ambiguous_mnist,
    generate_ambiguous_mnist,
    save_image_grid,
    write_quality_report,
)
from pyro_bq.data.dirty import DirtyMNIST, add_noise, dirty_mnist_test_sets
from pyro_bq.data.ood import load_ood_dir
from pyro_bq.guides import DETERMINISTIC_THRESHOLD, AutoLogQuantNormal, AutoMeanFieldNormal, init_to_pretrained, quantize
from pyro_bq.inference import fit_svi
from pyro_bq.io import atomic_write_bytes, memory_report, write_container
from pyro_bq.mixed import quantile_inform, random_bits, smol
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.priors import LayerwiseNormal
from pyro_bq.pwfn import PWFN, AutoPWFN, codebook_policy
from pyro_bq.quant import JQ, end_site_bits, make_policy, quantize_activations
from pyro_bq.recipes import fit_meanfield_bnn, load_meanfield_guide, pretrain, save_meanfield_guide, scale_aware_adam
from pyro_bq.uncertainty import auroc, evaluate_details, to_arviz, uncertainty_scores

from .config import PWFN_SCHEDULE, RowSpec, StudyConfig, check_out_dir, file_sha256
from .plots import make_plots
from .report import COLUMNS, write_tables

__all__ = ["run_study", "StudyResult", "StudyBusyError", "RowContext", "ROW_BUILDERS", "COLUMNS", "row_seed"]

log = logging.getLogger("pyro_bq.study")


class StudyResult(dict):
    """What :func:`run_study` returns: ``rows`` (list of records), ``errors`` ({row: error text}), ``files``, ``data``."""


class StudyBusyError(RuntimeError):
    """Another study holds the lock of the output folder."""


#: The lock file every study holds in its output folder while it runs.
LOCK_NAME = ".study.lock"


@contextlib.contextmanager
def _folder_lock(out: Path):
    """Hold an exclusive ``flock`` on ``out/.study.lock`` (with this PID in it) for the ``with`` block.

    :raises StudyBusyError: another process holds it; the message names its PID.
    """
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ValueError(f"out_dir: lock file {str(path)!r} cannot be opened ({err.strerror or err}); "
                         "remove it if it is not a regular file") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise StudyBusyError(
                f"out_dir {str(out)!r} is in use by PID {holder} (another study runs there); "
                "wait for it to finish or choose another --out-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def row_seed(seed: int, name: str) -> int:
    """The seed of study row ``name``: every random draw of the row comes from it.

    Derived from the study's ``seed`` and the row's name only, so a row gets the
    same draws whichever rows ran before it (a resumed study equals an
    uninterrupted one).

    Usage::

        torch.Generator().manual_seed(row_seed(0, "jq4+act8"))
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _atomic_json(path: Path, obj) -> None:
    atomic_write_bytes(path, [json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode()])


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in JSON")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _bar(total, desc, enabled):
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def _load_data(cfg: StudyConfig):
    amnist_cfg = cfg.amnist_config()
    info = {}
    original = find_original_ambiguous_mnist(cfg.data_dir) if cfg.amnist_source != "generated" else None
    grid = cfg.out_path / "ambiguous_mnist_samples.png"
    if original is None:
        if cfg.amnist_source == "original":
            raise FileNotFoundError("amnist_source='original' but no amnist_samples.pt / amnist_labels.pt under data_dir")
        gen = generate_ambiguous_mnist(cfg.data_dir, cfg.cache_path, amnist_cfg, progress=cfg.progress)
        info = {"source": "generated", "cache": str(gen.path), "from_cache": gen.from_cache, **gen.stats}
        log.info(
            "Ambiguous-MNIST: generated (%s), mean ensemble entropy %.3f nats vs MNIST %.3f nats (ratio %.1f)",
            "from cache" if gen.from_cache else "new",
            gen.stats["mean_entropy_ambiguous"],
            gen.stats["mean_entropy_mnist"],
            gen.stats["mean_entropy_ambiguous"] / max(gen.stats["mean_entropy_mnist"], 1e-12),
        )
        info["quality_report"] = write_quality_report(gen, cfg.out_path)["ambiguous_quality"]
    else:
        info = {"source": "original", "folder": str(original)}
        log.info("Ambiguous-MNIST: original release files from %s", original)
    train = DirtyMNIST(
        cfg.data_dir, True, cache_dir=cfg.cache_path, source=cfg.amnist_source, config=amnist_cfg,
        mnist_limit=cfg.mnist_limit, seed=cfg.seed, progress=cfg.progress, noise_std=cfg.amnist_noise,
    )
    if original is not None and not grid.is_file():
        amb = train.x[train.is_ambiguous][:1280:10] * 0.3081 + 0.1307
        save_image_grid(amb, grid, title="original Ambiguous-MNIST")
    tests = dirty_mnist_test_sets(
        cfg.data_dir, cache_dir=cfg.cache_path, source=cfg.amnist_source, config=amnist_cfg,
        limit=cfg.eval_limit, seed=cfg.seed, progress=cfg.progress, noise_std=cfg.amnist_noise,
    )
    if cfg.ood_dir is not None:
        for i, (name, data) in enumerate(load_ood_dir(cfg.ood_dir).items()):
            if name in tests:
                raise ValueError(f"ood_dir: the set {name!r} has the name of a built-in test set; rename it")
            limited = data if cfg.eval_limit is None or cfg.eval_limit >= len(data) else data.subset(cfg.eval_limit, seed=cfg.seed + 100 + i)
            tests[name] = add_noise(limited, cfg.amnist_noise, cfg.seed + 200 + i)
    return train, tests, info


#: The study's own test sets; every other key of the test-set dict is an extra OOD set (``ood_dir``).
BUILTIN_SETS = ("mnist", "ambiguous", "fashion")


def extra_ood_sets(tests: dict) -> list[str]:
    """Names of the extra OOD sets among ``tests``, in order."""
    return [k for k in tests if k not in BUILTIN_SETS]


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------
def _make_model(cfg: StudyConfig, dataset_size: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return BayesianClassifier(LeNet5(), LayerwiseNormal(cfg.prior_gain), dataset_size).to(cfg.torch_device)


def _train_guide(cfg: StudyConfig, train, folder: Path):
    """The float mean-field guide: loaded from ``cfg.checkpoint`` / an earlier run, or trained."""
    model = _make_model(cfg, len(train))
    final = folder / "guide.bq"
    source = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else final
    guide = load_meanfield_guide(source, model, train.x[:2].to(cfg.torch_device))
    if guide is not None:
        log.info("float guide loaded from %s", source)
        return model, guide
    if cfg.checkpoint:
        raise FileNotFoundError(f"checkpoint {cfg.checkpoint!r} not found")
    net = None
    if cfg.pretrain_epochs > 0:
        net = pretrain(LeNet5, train, epochs=cfg.pretrain_epochs, lr=2e-3, batch_size=cfg.batch_size, seed=cfg.seed,
                       data_seed=cfg.seed + 7, checkpoint=folder / "pretrained.bq", progress=cfg.progress,
                       device=cfg.torch_device)
    t0 = time.time()
    guide, result = fit_meanfield_bnn(
        model, train, pretrained=net, init_scale=cfg.init_scale, num_epochs=cfg.num_epochs, batch_size=cfg.batch_size,
        lr=cfg.lr, scale_lr=cfg.lr if cfg.scale_lr is None else cfg.scale_lr, seed=cfg.seed,
        checkpoint_dir=folder / "svi", checkpoint_every=200, progress=cfg.progress,
    )
    log.info("SVI: %d steps in %.0f s%s", result.steps, time.time() - t0,
             f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    save_meanfield_guide(final, guide, key=cfg.train_fingerprint())
    return model, guide


# ---------------------------------------------------------------------------
# row builders
# ---------------------------------------------------------------------------
@dataclass
class RowContext:
    """What a row builder gets: the settings, the model, the float guide, the training data and folder.

    ``memo`` holds what several rows share (the log-quantized guide serves the
    rows with and without quantized activations).
    """

    cfg: StudyConfig
    model: object
    guide: object
    train: object
    folder: Path
    memo: dict = field(default_factory=dict)


def _row_float(ctx: RowContext, spec: RowSpec):
    """The shared float guide, or (``spec.steps``) a copy trained that many more SVI steps: the
    matched-budget baseline of the trained rows, with the float guide's optimizer recipe."""
    if spec.steps is None:
        return ctx.guide, {}
    cfg = ctx.cfg
    guide = AutoMeanFieldNormal(ctx.model)
    guide.setup(ctx.train.x[:2])
    guide.load_state_dict(ctx.guide.state_dict())
    fit_svi(ctx.model, guide, ctx.train, num_steps=spec.steps, batch_size=cfg.batch_size,
            optim=scale_aware_adam(cfg.lr, cfg.lr if cfg.scale_lr is None else cfg.scale_lr),
            seed=row_seed(cfg.seed, spec.name) % 2**31, checkpoint_dir=ctx.folder / spec.name, checkpoint_every=100,
            progress=cfg.progress)
    return guide, {"extra_svi_steps": spec.steps}


def _row_post_hoc(ctx: RowContext, spec: RowSpec):
    """VPQ, SPQ or JQ at the row's bits; the first and the last layer at ``ends_bits`` when that is more.
    A family ending in ``-sr`` (``spq-sr``, ``jq-sr``) rounds the sampled weights stochastically
    (``cfg.sr_rounding``: by default the variance-matched rule where it matches the posterior's variance,
    round to nearest elsewhere)."""
    site_bits = end_site_bits(ctx.guide.sites, ctx.cfg.ends_bits, spec.bits)
    extra = {"ends_bits": ctx.cfg.ends_bits, "end_sites": sorted(site_bits)} if site_bits else {}
    rounding = ctx.cfg.sr_rounding if spec.family.endswith("-sr") else None
    if rounding:
        extra["rounding"] = rounding
    policy = make_policy(spec.family.removesuffix("-sr"), spec.bits, site_bits=site_bits, rounding=rounding)
    return quantize(ctx.guide, policy), extra


def _row_logquant(ctx: RowContext, spec: RowSpec):
    """The log-quantized guide: started from the float guide, fine-tuned ``logquant_steps`` SVI steps."""
    cfg = ctx.cfg
    if "logquant" not in ctx.memo:
        ctx.memo["logquant"] = _fit_logquant(ctx)
    return ctx.memo["logquant"], {"scale_bits": cfg.logquant_bits}


def _fit_logquant(ctx: RowContext):
    """The log-quantized guide the ``logquant`` rows share, drawn from its own seed whichever row builds it."""
    cfg = ctx.cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(row_seed(cfg.seed, "logquant"))
        locs = {name: ctx.guide.get_loc_scale(name)[0].detach().clone() for name in ctx.guide.sites}
        lq = AutoLogQuantNormal(ctx.model, bits=cfg.logquant_bits, init_loc_fn=lambda site: locs[site["name"]],
                                init_scale=cfg.init_scale)
        lq.setup(ctx.train.x[:2].to(cfg.torch_device), ctx.train.y[:2].to(cfg.torch_device))
        with torch.no_grad():
            _, scale = ctx.guide.flat_loc_scale()
            lq.log2_scale.copy_(torch.log2(scale.detach().clamp_min(1e-30)))
        fit_svi(ctx.model, lq, ctx.train, num_steps=cfg.logquant_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                seed=cfg.seed + 1, checkpoint_dir=ctx.folder / f"logquant{cfg.logquant_bits}", checkpoint_every=100,
                progress=cfg.progress)
    return lq


def _row_pwfn(ctx: RowContext, spec: RowSpec):
    """PWFN started from the float guide's means, packed as codebook indices (the same guide, exactly)."""
    cfg = ctx.cfg
    net = LeNet5()
    net.load_state_dict({k[len("net."):]: v for k, v in ctx.guide.median().items()}, strict=False)
    guide = AutoPWFN(ctx.model, init_loc_fn=init_to_pretrained(net))
    result = PWFN(
        ctx.model, guide, ctx.train, schedule=PWFN_SCHEDULE, num_steps=cfg.extra_steps,
        batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, checkpoint_dir=ctx.folder / "pwfn", eval_samples=4,
        progress=cfg.progress, log=lambda line: log.info("PWFN: %s", line),
    ).run()
    final = {k: v for k, v in (result.final or {}).items() if isinstance(v, (int, float, str))}
    return quantize(guide, codebook_policy(guide)), {"pwfn": final}


def _row_allocation(ctx: RowContext, spec: RowSpec):
    """A mixed-precision allocation (QI, RB or SMOL) at ``mixed_bits`` mean bits, quantized with JQ."""
    cfg, base = ctx.cfg, ctx.guide
    if spec.family == "qi":
        alloc = quantile_inform(base, cfg.mixed_bits)
    elif spec.family == "rb":
        alloc = random_bits(base, cfg.mixed_bits, num_steps=max(cfg.extra_steps, 50), seed=cfg.seed)
    else:
        alloc, base = smol(ctx.model, base, ctx.train, precision_steps=cfg.extra_steps,
                           finetune_steps=cfg.extra_steps, batch_size=cfg.batch_size, seed=cfg.seed)
    qguide = quantize(base, JQ(8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers))
    return qguide, {"method": alloc.method, "mean_bits": float(alloc.mean_bits), "code_bits": float(alloc.code_bits),
                    "storage_bits": float(alloc.storage_bits), "training": alloc.training, "layer_bits": {
        k: float(v) for k, v in alloc.layer_bits().items()}}


#: The study's row kinds: family name -> ``builder(ctx: RowContext, spec: RowSpec) -> (guide, extra)``,
#: where ``extra`` is a JSON-able dict stored with the row's record. This table is the place to
#: add a study row: write a builder, register it here under a new family name, and add that name
#: to :data:`pyro_bq.study.config.ALL_POLICIES` (and to :meth:`StudyConfig.rows`).
ROW_BUILDERS: dict[str, Callable] = {
    "float": _row_float,
    "vpq": _row_post_hoc,
    "spq": _row_post_hoc,
    "jq": _row_post_hoc,
    "spq-sr": _row_post_hoc,
    "jq-sr": _row_post_hoc,
    "logquant": _row_logquant,
    "pwfn": _row_pwfn,
    "qi": _row_allocation,
    "rb": _row_allocation,
    "smol": _row_allocation,
}


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
#: inputs per network pass of the row evaluation and of the ArviZ export: equal batches give
#: equal logits, so the export can take the evaluation's
EVAL_BATCH = 500


def _evaluate_row(cfg: StudyConfig, spec: RowSpec, model, guide, tests, train, row_dir: Path, extra: dict):
    eval_model = model
    if spec.act_bits is not None:
        seed = row_seed(cfg.seed, spec.name)
        calib = train.x[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: cfg.calib_rows]]
        eval_model = quantize_activations(model, spec.act_bits, guide=guide, data=calib, seed=seed)
    t0 = time.time()
    record, details = evaluate_details(
        eval_model, guide, tests["mnist"], tests["fashion"], ambiguous_data=tests["ambiguous"],
        num_samples=cfg.num_samples, seed=cfg.seed, batch_size=EVAL_BATCH, keep_logits=True,
    )
    extra_ood = _evaluate_extra_ood(cfg, eval_model, guide, tests, details["in"])
    memory = memory_report(guide)
    baseline = cfg.baseline_of(spec)
    row = {
        "config": spec.name,
        "policy": spec.family,
        "bits": spec.bits,
        "act_bits": spec.act_bits,
        "accuracy": record["accuracy"],
        "nll": record["nll"],
        "ece": record["ece"],
        "auroc_mi_fashion": record["auroc_mi"],
        "auroc_ee_ambiguous": record["auroc_aleatoric_ambiguous"],
        "bits_per_param": float(memory.bits_per_param),
        "packed_bytes": int(memory.file_bytes),
        "training": spec.training,
        "mi_in": record["epistemic_in"],
        "varying_fraction": record.get("varying_fraction"),
        "stochastic_fraction": memory.uniforms_per_draw / memory.num_params,
        "collapsed": _collapsed(record),
        "code_bits": extra.get("code_bits"),
        "storage_bits": extra.get("storage_bits"),
        "baseline": None if baseline is None else baseline.name,
        **{k: v for k, v in extra_ood.items() if k.startswith("auroc_")},
        "details": {k: v for k, v in record.items() if k not in ("accuracy", "nll", "ece")},
        "eval_seconds": round(time.time() - t0, 2),
        **({"extra": extra} if extra else {}),
    }
    _write_scores(row_dir / f"{spec.name}.scores.bq", spec.name, details, tests["mnist"].y, extra_ood.get("details", {}))
    _write_arviz(cfg, eval_model, guide, tests, row_dir / f"{spec.name}.nc", _arviz_logits(cfg, details, tests))
    return row


def _collapsed(record: dict) -> bool:
    """Whether the guide's draws barely vary: overall or at some site, below ``DETERMINISTIC_THRESHOLD``."""
    if record.get("varying_fraction") is None:
        return False
    return bool(record["deterministic_sites"]) or record["varying_fraction"] < DETERMINISTIC_THRESHOLD


def _evaluate_extra_ood(cfg: StudyConfig, model, guide, tests: dict, mnist: dict) -> dict:
    """AUROC(MI) and AUROC(total entropy) of MNIST against each extra OOD set, with the row's
    weight draws (the same ``num_samples`` and seed as the built-in sets; ``mnist``: the row's MNIST
    decomposition, not computed again): ``{"auroc_mi_ood_NAME": ..., "auroc_total_ood_NAME": ...,
    "details": {NAME: decomposition}}``."""
    names = extra_ood_sets(tests)
    if not names:
        return {"details": {}}
    details = uncertainty_scores(model, guide, {name: tests[name] for name in names}, num_samples=cfg.num_samples,
                                 seed=cfg.seed, batch_size=EVAL_BATCH)
    out = {}
    for name, parts in details.items():
        out[f"auroc_mi_ood_{name}"] = auroc(mnist["epistemic"], parts["epistemic"])
        out[f"auroc_total_ood_{name}"] = auroc(mnist["total"], parts["total"])
    out["details"] = details
    return out


def _write_scores(path: Path, name: str, details: dict, mnist_y: torch.Tensor, extra: dict) -> None:
    """The per-input scores the plots read (a pickle-free container); ``extra``: ``{OOD set: decomposition}``."""
    tensors = {}
    for set_name, parts in extra.items():
        tensors[f"{set_name}_aleatoric"] = parts["aleatoric"].float()
        tensors[f"{set_name}_epistemic"] = parts["epistemic"].float()
    for key, set_name in (("in", "mnist"), ("ambiguous", "ambiguous"), ("ood", "fashion")):
        tensors[f"{set_name}_aleatoric"] = details[key]["aleatoric"].float()
        tensors[f"{set_name}_epistemic"] = details[key]["epistemic"].float()
    tensors["mnist_mean_probs"] = details["in"]["mean_probs"].float()
    tensors["mnist_y"] = mnist_y
    write_container(path, "study-scores", {"config": name}, tensors)


def _arviz_logits(cfg: StudyConfig, details: dict, tests: dict):
    """The MNIST logits of the evaluation that the ArviZ file would compute again, or ``None``.

    Both draw with ``cfg.seed``; the evaluation's draws are the ArviZ draws when their numbers
    agree, and its first ``n`` logits are bitwise those of the ArviZ pass when the first ``n``
    inputs ran in the same batches of :data:`EVAL_BATCH` rows: ``n`` is all of the set or a
    multiple of the batch. Otherwise the ArviZ export predicts for itself.
    """
    n = min(cfg.arviz_limit, len(tests["mnist"]))
    logits = details["in"].get("logits")
    if logits is None or cfg.arviz_samples != cfg.num_samples or logits.shape[:2] != (cfg.num_samples, len(tests["mnist"])):
        return None
    if n != len(tests["mnist"]) and n % EVAL_BATCH:
        return None
    return logits[:, :n]


def _write_arviz(cfg, model, guide, tests, path: Path, logits=None) -> None:
    """The row's ArviZ file; ``logits``: the network outputs of its draws on its inputs when known
    (see :func:`_arviz_logits`)."""
    n = min(cfg.arviz_limit, len(tests["mnist"]))
    idata = to_arviz(model, guide, tests["mnist"].x[:n], tests["mnist"].y[:n], num_samples=cfg.arviz_samples,
                     seed=cfg.seed, batch_size=EVAL_BATCH, logits=logits)
    # HDF5 is written to memory, then to disk with the package's atomic writer: a disk error
    # during HDF5's own writes leaves its objects broken, and their clean-up crashes the process
    buf = io.BytesIO()
    encoding = {f"/{group}": {name: {"zlib": True} for name, var in getattr(idata, group).variables.items()
                              if var.dtype.kind in "biufcS"} for group in idata.groups()}
    idata.to_datatree().to_netcdf(buf, engine="h5netcdf", encoding=encoding)
    atomic_write_bytes(path, [buf.getbuffer()])


def _failed_row(spec: RowSpec, error: str) -> dict:
    """The record of a row that raised under ``keep_going``: its name and the error, no numbers."""
    return {"config": spec.name, "policy": spec.family, "bits": spec.bits, "act_bits": spec.act_bits,
            "training": spec.training, "error": error}


def _run_rows(cfg: StudyConfig, todo: list, ctx: RowContext, tests, row_dir: Path, fp: str) -> dict:
    """Build and evaluate the rows in ``todo``; returns ``{name: record}``.

    A row that raises stops the study (the exception names the row) unless
    ``cfg.keep_going``: then its record carries the error text instead.
    """
    rows = {}
    bar = _bar(len(todo), "study configurations", cfg.progress)
    for spec in todo:
        bar.set_postfix(config=spec.name)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(row_seed(cfg.seed, spec.name))  # any draw not seeded explicitly
                qguide, extra = ROW_BUILDERS[spec.family](ctx, spec)
                row = _evaluate_row(cfg, spec, ctx.model, qguide, tests, ctx.train, row_dir, extra)
        except Exception as err:
            if not cfg.keep_going:
                err.add_note(f"in study row {spec.name!r} (run with --keep-going to record the error and go on)")
                raise
            rows[spec.name] = _failed_row(spec, f"{type(err).__name__}: {err}")
            log.error("row %s failed: %s", spec.name, rows[spec.name]["error"])
        else:
            record = {"fingerprint": fp, "row": row, "files": _row_file_digests(row_dir, spec.name)}
            _atomic_json(row_dir / f"{spec.name}.json", record)
            rows[spec.name] = row
            log.info("%s: acc %.4f  AUROC(MI, Fashion) %.4f  AUROC(EE, Ambiguous) %.4f  %.2f bits/param",
                     spec.name, row["accuracy"], row["auroc_mi_fashion"], row["auroc_ee_ambiguous"],
                     row["bits_per_param"])
        bar.update(1)
    bar.close()
    return rows


#: The files of a study row besides its record ``<row>.json``.
ROW_FILES = (".scores.bq", ".nc")


def _row_file_digests(row_dir: Path, name: str) -> dict:
    """``{file name: SHA-256 or None}`` of the files of row ``name``."""
    return {f"{name}{suffix}": file_sha256("row file", row_dir / f"{name}{suffix}") for suffix in ROW_FILES}


def _finished_rows(specs: list, row_dir: Path, fp: str) -> dict:
    """``{name: record}`` of the rows an earlier run with the same settings finished.

    The record ``<row>.json`` is written last and holds the settings' fingerprint
    and the SHA-256 of each row file: a row counts as finished only when its
    files are still those it recorded (a run with other settings that stopped
    between two of the row's files leaves it unfinished).
    """
    rows = {}
    for spec in specs:
        done = _read_json(row_dir / f"{spec.name}.json")
        if not isinstance(done, dict) or done.get("fingerprint") != fp or "row" not in done:
            continue
        digests = _row_file_digests(row_dir, spec.name)
        if None not in digests.values() and done.get("files") == digests:
            rows[spec.name] = done["row"]
    return rows


# ---------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------
def run_study(cfg: StudyConfig) -> StudyResult:
    """Run (or resume) the study described by ``cfg``; returns the rows and the files written.

    The study holds an exclusive lock on ``out_dir`` (``out_dir/.study.lock``,
    with its PID) while it runs; torch runs with ``cfg.threads`` threads
    (restored afterwards).

    :raises StudyBusyError: another study is running in ``out_dir``; nothing was written.

    Usage::

        result = run_study(StudyConfig(data_dir="data", out_dir="runs/study"))
        print(result["files"]["markdown"])
    """
    if not isinstance(cfg, StudyConfig):
        raise TypeError(f"cfg must be a StudyConfig, got {type(cfg).__name__}")
    out = check_out_dir("out_dir", cfg.out_dir)
    threads = torch.get_num_threads()
    with _folder_lock(out):
        try:
            torch.set_num_threads(cfg.num_threads)
            return _run_locked(cfg, out)
        finally:
            torch.set_num_threads(threads)


def _run_locked(cfg: StudyConfig, out: Path) -> StudyResult:
    """The study in ``out``, whose lock this process holds."""
    check_out_dir("cache_dir", cfg.cache_path)
    fp = cfg.eval_fingerprint()
    train_dir = check_out_dir("out_dir", out / "train" / cfg.train_fingerprint())
    row_dir = check_out_dir("out_dir", out / "configs")
    _atomic_json(out / "study_config.json", {"config": cfg.to_dict(), "threads": cfg.num_threads, "fingerprint": fp})

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    train, tests, data_info = _load_data(cfg)
    log.info("Dirty-MNIST: %d training rows (%d MNIST + %d ambiguous); test sets %s", len(train), train.num_mnist,
             train.num_ambiguous, {k: len(v) for k, v in tests.items()})

    specs = cfg.rows()
    rows = _finished_rows(specs, row_dir, fp)
    if rows:
        log.info("resuming: %d finished configuration(s) skipped: %s", len(rows), ", ".join(rows))
    todo = [spec for spec in specs if spec.name not in rows]
    if todo or not (train_dir / "guide.bq").is_file():
        model, guide = _train_guide(cfg, train, train_dir)
        rows.update(_run_rows(cfg, todo, RowContext(cfg, model, guide, train, train_dir), tests, row_dir, fp))

    ordered = [rows[s.name] for s in specs]
    evaluated = [r for r in ordered if "error" not in r]
    files = write_tables(ordered, out, data_info=data_info, config=cfg)
    files.update(make_plots(evaluated, row_dir, out))
    files["ambiguous_grid"] = str(out / "ambiguous_mnist_samples.png")
    log.info("study finished in %.0f s; results in %s", time.time() - t_start, files["markdown"])
    errors = {r["config"]: r["error"] for r in ordered if "error" in r}
    return StudyResult(rows=evaluated, errors=errors, files=files, data=data_info)
