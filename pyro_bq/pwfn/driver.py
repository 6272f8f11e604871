"""The PWFN loop: train, cluster, repeat -- resumable, one checkpoint per round.

Round ``t`` (``t = 1..T``) retrains the free weights with the PWFN objective
(:class:`~pyro_bq.pwfn.regularizer.PWFNObjective` through
:func:`~pyro_bq.inference.fit_svi`), then clusters until a fraction ``p_t``
of all weights is fixed (:func:`~pyro_bq.pwfn.clustering.cluster_guide_`).
With ``p_T = 1`` every weight ends on a centre of the final codebook: the
guide's ``median()`` is the quantized network and its samples (each fixed
weight drawn around its centre with the spread of its group) give the
sampled ensemble.

Checkpoints (``checkpoint_dir``): after each round a pickle-free
``pwfn-{t}.bq`` file (guide, round log, RNG state), and
inside a round ``fit_svi``'s own checkpoints under ``round-{t}/``. Running
again with the same folder skips the finished rounds and resumes an
interrupted round from its last SVI checkpoint.

Readings of the paper:

* Schedule: the paper fixes weights in "nine rounds" of three epochs
  following WFN's schedule (its Figure 4, not legible in our copy). The
  authors' code runs ten fractions, ``0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95,
  0.975, 0.99, 1.0``, the first after a short round (5% of one epoch's
  batches): nine full rounds of 3 epochs, the paper's 27 epochs. That is
  :data:`PAPER_SCHEDULE` and ``preset="paper"``. The ``"fast"`` preset's
  :data:`DEFAULT_SCHEDULE` drops the 0.99 round and trains every round alike.
* Training per round, ``preset="paper"``: SGD with momentum 0.9 at learning
  rate 1e-3, 3 epochs per round, batch size 128 (the text). The authors'
  code also sets weight decay 1e-4, clips gradients at norm 1 and steps the
  rate down every 10 epochs (never reached in a 3-epoch round); we leave out
  the decay and the clipping. Their scales are sigma itself; ours are
  ``softplus(scale_raw)``, and SGD on the raw parameter moves sigma by
  ``sigmoid(raw)**2`` times the step SGD on sigma would take (about 4e-6
  for the Eq. 12 scales), so the paper preset steps sigma itself
  (``scale_step="sigma"``, :class:`~pyro_bq.pwfn.optim.SigmaSGD`);
  ``scale_step="raw"`` keeps plain SGD on the raw parameter. The learning
  rate applies to the minibatch's mean loss (the paper's cross entropy), so
  the ELBO's data-set-sized loss is stepped at ``lr / dataset_size``.
* The ``"fast"`` preset (default) trains 1 epoch per round with Adam:
  learning rate 1e-4 for the means and 1e-2 for the scales' raw parameters
  (see ``scale_lr``), for CPU budgets.
* The clustering level starts afresh every round (as in the authors' code);
  see :mod:`pyro_bq.pwfn.clustering` for the two level rules.
* Warm-up: the text starts the first round from the pretrained point net
  with the Eq. 12 scales. The authors' ``wfn_bayes.py`` instead loads a
  Bayesian checkpoint (``baseline.pt``) that ``run_a_single_example``
  trained beforehand, mu and sigma with the same regulariser, for a number
  of epochs their scripts do not fix (the paper's Figure 3 trains 30).
  ``warmup_epochs`` (0 in both presets) adds such a stage; it only lets the
  scales grow before the first weights are fixed. (Not yet measured at
  full size on LeNet-5 / MNIST.)
* Fixed weights stay fixed (the text: ``W_fixed`` only grows). The authors'
  ``Cluster.cluster_round`` re-clusters every weight each round, the fixed
  ones too (their mean on a centre, their sigma the group's std), so a
  weight fixed early may join another centre later. Not offered.
* How far sigma gets: with the linear hinge of Eq. 3
  (:mod:`.regularizer`) and SGD on sigma at lr 1e-3 and momentum 0.9, a
  free sigma rises by at most ``lr * alpha / (1 - momentum)``, about
  ``4.9e-6`` a step, ``6.9e-3`` per 3-epoch round on MNIST (1,407 steps).
  Measured (the free weights' median sigma after each round's training,
  ``sigma_median`` in the round log): 0.0020 (round 1, 24 steps), 0.0089,
  0.0157, 0.0226, ..., 0.048 (round 8) and 0.050 (round 9): the data term
  hardly pushes back, the regulariser alone sets the pace. The authors'
  gradient-level hinge (``2**-11 * relu(0.05 - sigma) * |eps|``) is about
  25 times slower from the Eq. 12 start, so in their runs sigma grows less,
  not more.
* Ensemble: the paper reports a "mean accuracy" over 20 weight draws, which
  can mean either of two numbers; the final table has both, for
  ``eval_samples`` draws (20 by default): ``ensemble_accuracy`` (accuracy of
  the averaged prediction) and ``ensemble_member_accuracy`` (mean of the
  draws' accuracies). The point-estimate accuracy uses the means (the
  cluster centres).
* The final table adds the per-site entropy and unique counts (the paper's
  Figure 2, ``per_site``) and, per codebook value, how far the fixed weights
  moved in sigmas (``movement``, from the groups of every round).

Acceptance on LeNet-5 / MNIST (full 60,000 / 10,000 images, pretrained 4
epochs to 98.61%, ``preset="paper"`` run to the end: 3 epochs a round, SGD
on sigma, ``b=7``, ``tau=1``, ``selection="reference"``, ``zero_fix`` as
given; ``benchmarks/pwfn_acceptance.py --train-limit 0 --test-limit 0
--pretrain-epochs 4 --pretrained lenet5.bq --preset paper --selections
reference --rules RULE --zero-fix Z [--warmup-epochs N]``):

=========  =======  ========  ========  =========  ======  =======  ======  ==========
level      warm-up  zero_fix  accuracy  ensemble   unique  entropy  zeros   point file
=========  =======  ========  ========  =========  ======  =======  ======  ==========
text       0        2**-7     98.67%    98.68%     15      3.11     11.8%   4.08 bit/w
reference  0        2**-7     99.08%    99.10%     50      3.04     25.2%   6.09 bit/w
text       10       2**-7     98.72%    98.78%     14      2.58     11.7%   4.08 bit/w
text       10       2**-4     98.90%    98.74%     9       1.30     75.8%   4.08 bit/w
text       10       0.075     98.69%    98.53%     9       0.89     82.9%   4.08 bit/w
=========  =======  ========  ========  =========  ======  =======  ======  ==========

``zero_fix=2**-7`` is the threshold of the authors' runs. With it, most
weights are fixed in the early rounds, while sigma is still small, to the
power of two nearest them: zero and ``+-2**-7 .. +-2**-1`` under the text's
rule (plus sums of up to four powers for the last 1% under the authors'
rule), with at most a quarter of the weights on zero. Both rules keep the
accuracy and the point file within ``ceil(log2 K) + 0.1`` bits a weight, but
end with 14-50 values and 2.6-3.1 bits.

With ``--warmup-epochs 10`` (the authors' start: sigma and mu trained with the
regulariser first, to 99.17% and a median sigma of 0.024) the free sigmas sit
at ``S`` from round 4 on. With the same mechanism at a larger threshold
(``zero_fix=0.075``: every free weight with ``|mu| <= 0.075`` goes to zero
first, within each round's fixing target) 82.9% of the weights end on zero
and the rest on ``+-2**-4 .. +-2**-1``: 9 values, 0.89 bits, the point
network at 98.69% (+0.08 points on the pretrained net). That is a pruning
threshold, not the paper's: the text has no zero fixing, and the authors'
code uses it only for ``|mu| < 2**-7``. The last round, which must fix every
remaining weight, raises the level until all fit (``b`` 40, ``tau`` 6.7e7 in
the log): with a ``tau`` that large its last 1% of weights go to their
nearest centre whatever their sigma, and the codebook grows from 7 to 9. The paper's own Table 1
reports 1.1 to 3.5 bits and 125 to 356 values on ImageNet.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import pyro
import torch
from tqdm.auto import tqdm

from pyro_bq._validation import (
    check_bool, check_callable, check_choice, check_float, check_int, check_path, check_positive, check_type,
)
from pyro_bq._validation import check_schedule as _check_schedule
from pyro_bq._validation import resolve_device
from pyro_bq.guides.pwfn import AutoPWFN, quantile
from pyro_bq.inference import fit_svi
from pyro_bq.inference.batches import as_batches, module_device
from pyro_bq.io.checkpoint import latest_checkpoint, load_checkpoint, replace_checkpoint, rng_state, set_rng_state
from pyro_bq.io.container import writable_folder
from pyro_bq.uncertainty import accuracy
from pyro_bq.uncertainty.predict import predict_with_labels
from pyro_bq.recipes import scale_aware_adam

from .clustering import ClusterConfig, cluster_guide_
from .metrics import cluster_movement, compression_stats, ensemble_accuracy, per_site_stats
from .optim import SigmaSGD
from .regularizer import DEFAULT_ALPHA, DEFAULT_S, PWFNObjective

__all__ = ["PWFN", "PWFNResult", "DEFAULT_SCHEDULE", "PAPER_SCHEDULE", "PRESETS", "check_schedule"]

DEFAULT_SCHEDULE = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 1.0)
#: the authors' fractions: a short first round (see ``first_round_fraction``), then nine of 3 epochs
PAPER_SCHEDULE = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)

#: training settings of each preset; an argument given explicitly to :class:`PWFN` wins
PRESETS = {
    "fast": {"optimizer": "adam", "lr": 1e-4, "scale_lr": 1e-2, "momentum": 0.0, "num_epochs": 1,
             "schedule": DEFAULT_SCHEDULE, "first_round_fraction": None, "scale_step": "raw", "warmup_epochs": 0},
    "paper": {"optimizer": "sgd", "lr": 1e-3, "scale_lr": 1e-3, "momentum": 0.9, "num_epochs": 3,
              "schedule": PAPER_SCHEDULE, "first_round_fraction": 0.05, "scale_step": "sigma",
              "warmup_epochs": 0},
}
_UNSET = object()


def check_schedule(schedule) -> tuple[float, ...]:
    """Validate a fixing schedule: numbers in (0, 1], strictly increasing, ending at 1.

    :param schedule: a sequence (list, tuple, 1-D tensor) of real numbers; a
        str such as ``"0.5,1"`` is refused.
    :returns: the fractions as a tuple of floats.
    :raises TypeError: if ``schedule`` is not a sequence of real numbers.
    :raises ValueError: if it is empty, holds a non-finite value or a value
        outside (0, 1], is not strictly increasing or does not end at 1.
    """
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Iterable) or (
        isinstance(schedule, torch.Tensor) and schedule.dim() != 1
    ):
        raise TypeError(f"schedule must be a sequence of fractions such as (0.5, 1.0), got {type(schedule).__name__}")
    items = schedule.tolist() if isinstance(schedule, torch.Tensor) else list(schedule)
    if not items:
        raise ValueError("schedule must hold at least one fraction (the last one 1.0)")
    values = _check_schedule("schedule", items)  # real, finite numbers (bools refused)
    if any(not (0.0 < p <= 1.0) for p in values):
        raise ValueError(f"schedule fractions must lie in (0, 1], got {list(values)}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"schedule must be strictly increasing (p_t+1 > p_t), got {list(values)}")
    if values[-1] != 1.0:
        raise ValueError(f"schedule must end at 1.0 (p_T = 1: every weight fixed), got {values[-1]}")
    return values


@dataclass
class PWFNResult:
    """What :meth:`PWFN.run` returns."""

    guide: object
    rounds: list = field(default_factory=list)  # one dict per round
    final: dict = field(default_factory=dict)
    resumed_from: Optional[str] = None


class PWFN:
    """Probabilistic weight fixing: alternate SVI training and PWFN clustering.

    :param model: a :class:`~pyro_bq.models.BayesianClassifier`.
    :param guide: an :class:`~pyro_bq.guides.pwfn.AutoPWFN` (started from a
        pretrained net for ``mode="paper"``).
    :param train_data: training data: an :class:`~pyro_bq.data.InMemoryDataset`, a DataLoader or a
        re-iterable of ``(x, y)`` batches (what :func:`~pyro_bq.inference.fit_svi` takes).
    :param test_data: evaluation data for the round log and the final table (optional; the same kinds).
    :param dataset_size: the number of training examples when ``train_data`` cannot tell.
    :param device: where training, clustering and evaluation run (``"auto"``, ``"cpu"``, ``"cuda"``);
        default where the guide's parameters are (the model's, before the guide is set up). The
        model and guide are moved there.
    :param preset: ``"fast"`` (default: Adam, means at lr 1e-4 and raw scales
        at 1e-2, 1 epoch per round, :data:`DEFAULT_SCHEDULE`) or ``"paper"``
        (the paper's setup: SGD with momentum 0.9 at lr 1e-3, 3 epochs per
        round, :data:`PAPER_SCHEDULE` with a first round of 5% of an epoch, as
        in the authors' code). The arguments below that default to the preset
        override it one by one.
    :param schedule: fractions ``p_t`` fixed after each round (see :func:`check_schedule`).
    :param mode: ``"paper"`` (likelihood + sigma regulariser, reproduces the
        paper) or ``"elbo"`` (full ELBO + regulariser).
    :param S: target sigma of the regulariser (Eq. 3). :param alpha: its weight.
    :param cluster: a :class:`~pyro_bq.pwfn.clustering.ClusterConfig`.
    :param num_epochs: training epochs per round (ignored when ``num_steps`` is given).
    :param num_steps: training steps per round.
    :param first_round_fraction: the first round trains on this fraction of
        one epoch's batches (rounded up; None: like every other round).
    :param batch_size: minibatch size.
    :param optimizer: ``"adam"`` or ``"sgd"`` (a fresh optimizer each round,
        so the moments of newly fixed weights start at zero and they stay put).
    :param lr: learning rate of the means. For ``"sgd"`` it is the rate on
        the minibatch's *mean* loss, as in the paper: the ELBO sums the
        likelihood over the data set, so the step uses ``lr / dataset_size``.
        The fast preset's Adam rate is small (1e-4), so the pretrained means,
        anchored near powers of two, do not wander off during retraining.
    :param scale_lr: learning rate of the scales' raw (softplus-inverse)
        parameters (None: ``lr``). Adam moves a raw parameter by about ``lr``
        per step, and the raw scale must travel from about -7 (sigma ~ 1e-3)
        to about -3 (sigma = S = 0.05), so the fast preset gives it 1e-2.
        (Measured on MNIST/LeNet-5, 200 steps: median sigma went from 2.0e-3
        to 7.4e-3, 75% quantile from 2.5e-3 to 2.5e-2.)
    :param momentum: SGD momentum (0.9 in the paper; ignored by Adam).
    :param scale_step: ``"raw"`` (the optimizer steps the scales' raw
        parameters) or ``"sigma"`` (``optimizer="sgd"`` only: SGD steps
        ``sigma = softplus(raw)`` itself, as the authors' code does, through
        :class:`~pyro_bq.pwfn.optim.SigmaSGD`). Default: the preset's
        (``"sigma"`` for ``"paper"``, ``"raw"`` for ``"fast"``).
    :param warmup_epochs: epochs of training (mu and sigma, with the
        regulariser) before the first round, with no weight fixed (0 in both
        presets: the paper's text starts fixing from the pretrained net; the
        authors' pipeline starts its rounds from a Bayesian net already
        trained with the regulariser, see the module docstring).
    :param seed: base seed (round ``t`` trains with ``seed + t``; the warm-up with ``seed + 10**6``).
    :param train_mode: the modules' mode while training (:func:`~pyro_bq.inference.fit_svi`'s
        ``train_mode``; ``False`` keeps BatchNorm the fixed map of its running statistics).
    :param checkpoint_dir: folder for the per-round checkpoints (resume on rerun).
    :param eval_samples: ensemble size of the final evaluation (20 in the paper).
    :param progress: show progress bars. :param log: function called with each round's log line.

    Usage::

        guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
        result = PWFN(model, guide, train, test_data=test, num_epochs=1).run()
        result.final["entropy"], result.final["unique"], guide.median()
        PWFN(model, guide, train, test_data=test, preset="paper").run()   # SGD, 3 epochs a round
    """

    def __init__(
        self,
        model,
        guide,
        train_data,
        *,
        test_data=None,
        dataset_size: Optional[int] = None,
        device=None,
        preset: str = "fast",
        schedule=_UNSET,
        mode: str = "paper",
        S: float = DEFAULT_S,
        alpha: float = DEFAULT_ALPHA,
        cluster: ClusterConfig = ClusterConfig(),
        num_epochs=_UNSET,
        num_steps: Optional[int] = None,
        first_round_fraction=_UNSET,
        batch_size: int = 128,
        optimizer=_UNSET,
        lr=_UNSET,
        scale_lr=_UNSET,
        momentum=_UNSET,
        scale_step=_UNSET,
        warmup_epochs=_UNSET,
        seed: int = 0,
        train_mode: bool = True,
        checkpoint_dir=None,
        eval_samples: int = 20,
        eval_batch_size: int = 1000,
        progress: bool = True,
        log: Optional[Callable[[str], None]] = print,
    ):
        check_type("guide", guide, AutoPWFN, "an AutoPWFN guide")
        self.device = module_device(guide, model) if device is None else resolve_device(device)
        self.batches = as_batches(train_data, batch_size=batch_size, dataset_size=dataset_size, device=self.device,
                                  name="train_data")
        if test_data is not None:
            as_batches(test_data, name="test_data")  # the kind of data is checked here, its batches when read
        self.preset = check_choice("preset", preset, tuple(PRESETS))
        given = {"schedule": schedule, "num_epochs": num_epochs, "first_round_fraction": first_round_fraction,
                 "optimizer": optimizer, "lr": lr, "scale_lr": scale_lr, "momentum": momentum, "scale_step": scale_step,
                 "warmup_epochs": warmup_epochs}
        opts = {k: (PRESETS[preset][k] if v is _UNSET else v) for k, v in given.items()}
        self.schedule = check_schedule(opts["schedule"])
        self.mode = check_choice("mode", mode, ("paper", "elbo"))
        check_type("cluster", cluster, ClusterConfig, "a ClusterConfig")
        self.objective = PWFNObjective(guide, mode=mode, S=S, alpha=alpha)  # validates S, alpha, pretrained
        num_epochs = opts["num_epochs"]
        if num_steps is None:
            if num_epochs is None:
                raise ValueError("give num_epochs or num_steps (training per round)")
            num_epochs = check_int("num_epochs", num_epochs, low=1)
        else:
            num_steps = check_int("num_steps", num_steps, low=1)
        self.model, self.guide = model.to(self.device), guide.to(self.device)
        self.train_data, self.test_data, self.dataset_size = train_data, test_data, dataset_size
        self.cluster = cluster
        self.num_epochs, self.num_steps = num_epochs, num_steps
        frac = opts["first_round_fraction"]
        self.first_round_fraction = None if frac is None else check_float(
            "first_round_fraction", frac, low=0.0, high=1.0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.optimizer = check_choice("optimizer", opts["optimizer"], ("adam", "sgd"))
        self.lr = check_positive("lr", opts["lr"])
        self.scale_lr = self.lr if opts["scale_lr"] is None else check_positive("scale_lr", opts["scale_lr"])
        self.momentum = check_float("momentum", opts["momentum"], low=0.0, high=1.0, high_open=True)
        self.scale_step = check_choice("scale_step", opts["scale_step"], ("raw", "sigma"))
        if self.scale_step == "sigma" and self.optimizer != "sgd":
            raise ValueError('scale_step="sigma" needs optimizer="sgd" (use scale_step="raw" with Adam)')
        self.warmup_epochs = check_int("warmup_epochs", opts["warmup_epochs"], low=0)
        self.seed = check_int("seed", seed, low=0)
        self.train_mode = check_bool("train_mode", train_mode)
        self.checkpoint_dir = None if checkpoint_dir is None else check_path("checkpoint_dir", checkpoint_dir)
        self.eval_samples = check_int("eval_samples", eval_samples, low=1)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size, low=1)
        self.progress = check_bool("progress", progress)
        self.log = None if log is None else check_callable("log", log, "a function taking one str, or None")

    # -- helpers ---------------------------------------------------------------------------
    def _emit(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def _optimizer(self):
        if self.optimizer == "adam":
            return scale_aware_adam(self.lr, self.scale_lr)
        n = float(getattr(self.model, "dataset_size", None) or self.batches.require_size("PWFN with optimizer='sgd'"))
        lr, scale_lr, momentum = self.lr / n, self.scale_lr / n, self.momentum
        in_sigma = self.scale_step == "sigma"
        return pyro.optim.PyroOptim(SigmaSGD, lambda name: {
            "lr": scale_lr if "scale" in name.rsplit(".", 1)[-1] else lr, "momentum": momentum,
            "sigma_space": in_sigma and "scale" in name.rsplit(".", 1)[-1]})

    def _train_length(self, t: int) -> tuple[Optional[int], Optional[int]]:
        """``(num_epochs, num_steps)`` of round ``t + 1``."""
        if t == 0 and self.first_round_fraction is not None:
            per_epoch = self.batches.num_batches
            if per_epoch is None:
                raise ValueError("first_round_fraction needs the number of batches per epoch, which train_data "
                                 "cannot tell (it has no len()); pass first_round_fraction=None")
            return None, max(1, math.ceil(self.first_round_fraction * per_epoch))
        return self.num_epochs, self.num_steps

    def _accuracy(self) -> Optional[float]:
        if self.test_data is None:
            return None
        point = {k: v[None] for k, v in self.guide.median().items()}
        logits, y = predict_with_labels(self.model, None, self.test_data, samples=point, site="logits",
                                        batch_size=self.eval_batch_size, device=self.device, name="test_data")
        return accuracy(logits.softmax(-1), y)

    def _save(self, t: int, rounds: list, extra: dict) -> None:
        """Checkpoint the state after round ``t`` (in place of the one before) and drop round ``t``'s SVI checkpoints."""
        if self.checkpoint_dir is None:
            return
        state = {"round": t, "guide": self.guide.state_dict(), "rounds": rounds,
                 "extra": extra, "rng": rng_state()}
        replace_checkpoint(self.checkpoint_dir, t, state, prefix="pwfn")
        shutil.rmtree(self.checkpoint_dir / f"round-{t}", ignore_errors=True)

    def _resume(self, result: PWFNResult) -> tuple[int, list, dict]:
        """``(rounds done, round log, extra)`` from the latest round checkpoint, or of a fresh start."""
        folder = self.checkpoint_dir
        ckpt = None if folder is None else latest_checkpoint(writable_folder("checkpoint_dir", folder), "pwfn")
        if ckpt is None:
            return 0, [], {}
        state = load_checkpoint(ckpt)
        self.guide.load_state_dict(state["guide"])
        set_rng_state(state["rng"])
        result.resumed_from = str(ckpt)
        start = int(state["round"])
        self._emit(f"resumed from {ckpt.name}: {start} of {len(self.schedule)} rounds done")
        return start, list(state["rounds"]), dict(state["extra"])

    @torch.no_grad()
    def _free_sigma_quantiles(self) -> tuple[float, float]:
        """Median and 0.9 quantile of the free weights' sigma (NaN when none is free)."""
        _, sigma = self.guide.flat_loc_scale()
        free = sigma[~self.guide.fixed]
        if free.numel() == 0:
            return math.nan, math.nan
        return float(quantile(free, 0.5)), float(quantile(free, 0.9))

    def _warmup(self, extra: dict) -> None:
        """Train ``warmup_epochs`` epochs before the first round (once; recorded in ``extra``)."""
        if self.warmup_epochs == 0 or "warmup" in extra:
            return
        t0 = time.perf_counter()
        steps = fit_svi(
            self.model, self.guide, self.train_data, num_epochs=self.warmup_epochs, batch_size=self.batch_size,
            optim=self._optimizer(), elbo=self.objective, seed=self.seed + 10**6, dataset_size=self.dataset_size,
            device=self.device, checkpoint_dir=(self.checkpoint_dir / "warmup") if self.checkpoint_dir else None,
            progress=self.progress, step_hook=self.guide.enforce_fixed_, train_mode=self.train_mode,
        ).steps
        sigma_q = self._free_sigma_quantiles()
        acc = self._accuracy()
        extra["warmup"] = {"epochs": self.warmup_epochs, "train_steps": steps, "accuracy": acc,
                           "sigma_median": sigma_q[0], "sigma_q90": sigma_q[1], "train_s": time.perf_counter() - t0}
        acc_txt = "n/a" if acc is None else f"{100 * acc:.2f}%"
        self._emit(f"warm-up: {self.warmup_epochs} epochs ({steps} steps) acc={acc_txt} "
                   f"sigma median={sigma_q[0]:.3g} q90={sigma_q[1]:.3g} train={extra['warmup']['train_s']:.1f}s")
        if self.checkpoint_dir is not None:
            self._save(0, [], extra)
            shutil.rmtree(self.checkpoint_dir / "warmup", ignore_errors=True)

    def _round(self, t: int) -> dict:
        """Train round ``t + 1``'s free weights, then fix a fraction ``p_t`` of all; returns its log entry."""
        p = self.schedule[t]
        t0 = time.perf_counter()
        steps = 0
        if self.guide.num_fixed < self.guide.num_params:
            num_epochs, num_steps = self._train_length(t)
            steps = fit_svi(
                self.model, self.guide, self.train_data, num_epochs=num_epochs, num_steps=num_steps,
                batch_size=self.batch_size, optim=self._optimizer(), elbo=self.objective, seed=self.seed + t,
                dataset_size=self.dataset_size, device=self.device,
                checkpoint_dir=(self.checkpoint_dir / f"round-{t + 1}") if self.checkpoint_dir else None,
                progress=self.progress, step_hook=self.guide.enforce_fixed_, train_mode=self.train_mode,
            ).steps
        t_train = time.perf_counter() - t0
        sigma_q = self._free_sigma_quantiles()
        t1 = time.perf_counter()
        res = cluster_guide_(self.guide, p, self.cluster)
        t_cluster = time.perf_counter() - t1
        self._groups.extend({k: g[k] for k in ("centre", "count", "d_max", "d_sum", "d_sumsq")} for g in res.groups)
        level = res.level
        acc = self._accuracy()
        entry = {
            "round": t + 1, "p": p, "fraction_fixed": self.guide.fraction_fixed,
            "codebook_size": int(self.guide.codebook().numel()), "new_groups": len(res.groups),
            "b": level.b, "order": level.order, "tau": level.tau, "accuracy": acc,
            "train_steps": steps, "train_s": t_train, "cluster_s": t_cluster,
            "sigma_median": sigma_q[0], "sigma_q90": sigma_q[1],
        }
        acc_txt = "n/a" if acc is None else f"{100 * acc:.2f}%"
        self._emit(
            f"round {t + 1}/{len(self.schedule)}: p={p:g} fixed={100 * entry['fraction_fixed']:.1f}% "
            f"codebook={entry['codebook_size']} (b={level.b}, order={level.order}, tau={level.tau:g}) "
            f"acc={acc_txt} free sigma median={sigma_q[0]:.3g} q90={sigma_q[1]:.3g} "
            f"train={t_train:.1f}s cluster={t_cluster:.2f}s"
        )
        return entry

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> PWFNResult:
        """Run (or resume) all rounds and evaluate the final network."""
        x0, y0 = self.batches.first()
        self.guide.setup(x0, y0)
        self.guide.to(self.device)
        result = PWFNResult(self.guide)
        start, rounds, extra = self._resume(result)
        self._groups = extra.setdefault("groups", [])
        if "pretrained_accuracy" not in extra:
            acc0 = self._accuracy()
            extra["pretrained_accuracy"] = acc0
            if acc0 is not None:
                self._emit(f"start: point accuracy {100 * acc0:.2f}%")
        if start == 0:
            self._warmup(extra)
        bar = tqdm(total=len(self.schedule), initial=start, desc="PWFN rounds", dynamic_ncols=True) if self.progress else None
        try:
            for t in range(start, len(self.schedule)):
                entry = self._round(t)
                rounds.append(entry)
                self._save(t + 1, rounds, extra)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        result.rounds = rounds
        result.final = self.evaluate()
        result.final["pretrained_accuracy"] = extra.get("pretrained_accuracy")
        result.final["movement"] = cluster_movement(self._groups)
        result.final["warmup"] = extra.get("warmup")
        return result

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Compression figures of ``guide.median()`` and (with test data) point and ensemble accuracy."""
        out = compression_stats(self.guide.median())
        out["per_site"] = per_site_stats(self.guide.median())
        out["fraction_fixed"] = self.guide.fraction_fixed
        if self.test_data is not None:
            out["accuracy"] = self._accuracy()
            ens = ensemble_accuracy(
                self.model, self.guide, self.test_data, num_samples=self.eval_samples, seed=self.seed,
                device=self.device)
            out["ensemble_accuracy"] = ens["ensemble"]
            out["ensemble_member_accuracy"] = ens["mean_member"]
            out["ensemble_samples"] = self.eval_samples
        return out
