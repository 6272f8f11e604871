"""Monte Carlo predictions of a model under a guide, vectorized over weight samples.

Two paths give the same numbers for the same weight draws:

* **vectorized** (default whenever possible): weight samples come from
  ``guide.sample_latents(S)`` (any :class:`~pyro_bq.guides.AutoGaussianSites`
  guide, quantized guides included) or, for other guides, from the guide run
  under :class:`pyro.infer.Predictive`; the network then runs all samples of a
  chunk in one :func:`torch.func.vmap` pass via ``model.batched_forward``.
* **predictive**: stock :class:`pyro.infer.Predictive` over the model, which
  runs one model pass per sample. Used for models without ``batched_forward``.

Inputs are processed in batches of ``batch_size`` rows and samples in chunks
of ``sample_chunk`` draws, so the largest intermediate tensor holds
``sample_chunk * batch_size`` network activations whatever the size of ``x``.
The ``S`` weight draws are made once, in one vectorized call, and used for
every input batch; with a ``seed`` they do not depend on the chunk sizes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional

import pyro.poutine as poutine
import torch
from pyro.infer import Predictive

from pyro_bq._validation import check_callable, check_choice, check_int

__all__ = [
    "predictive_logits",
    "predictive_probs",
    "predictive_regression",
    "sample_weights",
    "DEFAULT_ACTIVATION_BUDGET",
    "DEFAULT_NUM_SAMPLES",
]

#: Number of weight draws when ``num_samples`` is not given.
DEFAULT_NUM_SAMPLES = 100

#: Default bound on ``sample_chunk * batch_size`` (examples x samples in one vmap pass).
DEFAULT_ACTIVATION_BUDGET = 4096

_METHODS = ("auto", "vectorized", "predictive")


def _as_inputs(name: str, x) -> torch.Tensor:
    """Accept a tensor or anything with an ``.x`` tensor (an InMemoryDataset)."""
    if not isinstance(x, torch.Tensor) and isinstance(getattr(x, "x", None), torch.Tensor):
        x = x.x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of inputs (or an InMemoryDataset), got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, ...features) with N >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_num_samples(num_samples) -> int:
    return check_int("num_samples", num_samples, low=1)


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Run the block with torch's CPU RNG seeded, leaving the global state as it was."""
    if seed is None:
        yield
        return
    seed = check_int("seed", seed, low=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _ensure_setup(guide, x: torch.Tensor) -> None:
    if getattr(guide, "prototype_trace", "missing") is None:
        if hasattr(guide, "setup"):
            try:
                guide.setup(x[:1])
            except ValueError as err:
                raise ValueError(
                    f"could not set up the untrained {type(guide).__name__} from x alone ({err}); "
                    "train it first or call guide.setup(x, y)"
                ) from err
        else:
            raise ValueError(
                f"the {type(guide).__name__} guide has no parameters yet: train it, or call it once "
                "with the model's arguments (e.g. guide(x, y)), before predicting"
            )


def _latent_names(guide, x: torch.Tensor) -> list[str]:
    trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(x[:1])
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("is_auxiliary", False)
    ]


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(size, total - start)


def _resolve_sizes(num_samples: int, batch_size: int, sample_chunk: Optional[int]) -> tuple[int, int]:
    batch_size = check_int("batch_size", batch_size, low=1)
    if sample_chunk is None:
        sample_chunk = max(1, DEFAULT_ACTIVATION_BUDGET // batch_size)
    sample_chunk = check_int("sample_chunk", sample_chunk, low=1)
    return batch_size, min(sample_chunk, num_samples)


def _check_samples(samples, num_samples: Optional[int]) -> tuple[dict, int]:
    if not isinstance(samples, Mapping) or not samples:
        raise TypeError("samples must be a non-empty dict mapping site names to tensors of shape (S, ...)")
    sizes = set()
    for name, value in samples.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            raise TypeError(f"samples[{name!r}] must be a tensor with a leading sample dimension")
        sizes.add(value.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"all entries of samples must have the same number of draws, got {sorted(sizes)}")
    s = sizes.pop()
    if num_samples is not None and num_samples != s:
        raise ValueError(f"num_samples={num_samples} disagrees with the {s} draws in samples; give one of them")
    return dict(samples), s


@torch.no_grad()
def sample_weights(model, guide, num_samples: int, x: Optional[torch.Tensor] = None, *, seed: Optional[int] = None) -> dict:
    """``num_samples`` joint draws of the guide's latent sites: ``{site: (S, *shape)}``.

    Uses the guide's vectorized ``sample_latents`` when it has one; otherwise
    runs the guide under :class:`pyro.infer.Predictive` (``x`` is then needed
    as example input, a single row is enough).

    Usage::

        draws = sample_weights(model, guide, 100)
        logits = model.batched_forward(draws, x)   # (100, N, C)
    """
    num_samples = _check_num_samples(num_samples)
    with _seeded(seed):
        if hasattr(guide, "sample_latents"):
            if x is not None:
                _ensure_setup(guide, _as_inputs("x", x))
            return guide.sample_latents(num_samples)
        if x is None:
            raise ValueError("x (example inputs) is needed to sample from a guide without sample_latents")
        x = _as_inputs("x", x)
        names = _latent_names(guide, x)
        if not names:
            raise ValueError("the guide has no latent sample sites to draw")
        # run the guide alone: its sample sites are the latents, shaped (S, *site_shape)
        return Predictive(guide, num_samples=num_samples, return_sites=names)(x[:1])


def _vectorized(model, samples: dict, x: torch.Tensor, num_samples: int, batch_size: int, sample_chunk: int) -> torch.Tensor:
    rows = []
    for start, size in _chunks(num_samples, sample_chunk):
        part = {k: v[start : start + size] for k, v in samples.items()}
        rows.append(torch.cat([model.batched_forward(part, x[i : i + batch_size]) for i in range(0, len(x), batch_size)], 1))
    return torch.cat(rows, 0)


def _predictive(model, guide, samples: Optional[dict], x, num_samples, batch_size, site) -> torch.Tensor:
    if samples is None:
        samples = sample_weights(model, guide, num_samples, x)
    out = []
    for i in range(0, len(x), batch_size):
        pred = Predictive(model, posterior_samples=samples, return_sites=[site])(x[i : i + batch_size])
        if site not in pred:
            raise ValueError(f"the model has no site {site!r}; pass site= the name of its output site")
        out.append(pred[site])
    return torch.cat(out, 1)


@torch.no_grad()
def predictive_logits(
    model,
    guide=None,
    x=None,
    *,
    num_samples: Optional[int] = None,
    batch_size: int = 500,
    sample_chunk: Optional[int] = None,
    samples: Optional[Mapping[str, torch.Tensor]] = None,
    seed: Optional[int] = None,
    method: str = "auto",
    site: str = "logits",
) -> torch.Tensor:
    """Network outputs (e.g. logits) for ``S`` weight draws: a tensor ``(S, N, ...)``.

    :param model: a Pyro model; a :class:`~pyro_bq.models.BayesianModel` gives the
        vectorized path.
    :param guide: the guide to draw weights from (not needed when ``samples`` is given).
    :param x: inputs ``(N, ...)`` or an ``InMemoryDataset``.
    :param num_samples: number of weight draws ``S`` (>= 1; default
        :data:`DEFAULT_NUM_SAMPLES`, or the number of draws in ``samples``).
    :param batch_size: inputs per network pass.
    :param sample_chunk: weight draws per vectorized pass; default keeps
        ``sample_chunk * batch_size <= DEFAULT_ACTIVATION_BUDGET``.
    :param samples: precomputed draws ``{site: (S, ...)}`` (e.g. from
        :func:`sample_weights`) instead of drawing from ``guide``.
    :param seed: seed for the weight draws (the global RNG state is left untouched);
        equal seeds give equal draws whatever ``x``, ``batch_size``, ``sample_chunk``
        and ``method``, so several datasets can share them.

    The ``S`` weight draws are held at once (``S`` times the number of weights);
    activations are bounded by ``sample_chunk * batch_size`` inputs.

    Usage::

        logits = predictive_logits(model, guide, test.x, num_samples=50, seed=0)   # (50, N, C)
    :param method: ``"auto"``, ``"vectorized"`` (needs ``model.batched_forward``)
        or ``"predictive"`` (stock :class:`pyro.infer.Predictive`).
    :param site: the deterministic output site used by the ``"predictive"`` path.
    """
    check_callable("model", model, "a Pyro model (e.g. a pyro_bq BayesianClassifier)")
    if guide is not None and not callable(guide):
        raise TypeError(f"guide must be a Pyro guide (e.g. AutoMeanFieldNormal) or None, got {type(guide).__name__}")
    x = _as_inputs("x", x)
    check_choice("method", method, _METHODS)
    if samples is None:
        if guide is None:
            raise ValueError("give a guide to draw weights from, or samples=")
        num_samples = _check_num_samples(DEFAULT_NUM_SAMPLES if num_samples is None else num_samples)
    else:
        if num_samples is not None:
            _check_num_samples(num_samples)
        samples, num_samples = _check_samples(samples, num_samples)
    batch_size, sample_chunk = _resolve_sizes(num_samples, batch_size, sample_chunk)
    vectorizable = hasattr(model, "batched_forward")
    if method == "vectorized" and not vectorizable:
        raise ValueError(f"method='vectorized' needs a model with batched_forward; {type(model).__name__} has none")
    if guide is not None:
        _ensure_setup(guide, x)
    with _seeded(seed):
        if method == "predictive" or not vectorizable:
            return _predictive(model, guide, samples, x, num_samples, batch_size, site)
        if samples is not None:
            unknown = [s for s in getattr(model, "weight_sites", []) if s not in samples]
            if unknown:
                raise ValueError(f"samples lacks the model's weight sites {unknown}")
            return _vectorized(model, samples, x, num_samples, batch_size, sample_chunk)
        # all draws at once, so they do not depend on batch_size or sample_chunk
        draws = sample_weights(model, guide, num_samples, x)
        return _vectorized(model, draws, x, num_samples, batch_size, sample_chunk)


def predictive_probs(
    model,
    guide=None,
    x=None,
    *,
    num_samples: Optional[int] = None,
    batch_size: int = 500,
    sample_chunk: Optional[int] = None,
    samples: Optional[Mapping[str, torch.Tensor]] = None,
    seed: Optional[int] = None,
    method: str = "auto",
) -> torch.Tensor:
    """Class probabilities for ``S`` weight draws: a tensor ``(S, N, C)``.

    The softmax of :func:`predictive_logits`; arguments as there.

    Usage::

        probs = predictive_probs(model, guide, test.x, num_samples=100)
        parts = decompose(probs)          # entropies in nats
    """
    logits = predictive_logits(
        model,
        guide,
        x,
        num_samples=num_samples,
        batch_size=batch_size,
        sample_chunk=sample_chunk,
        samples=samples,
        seed=seed,
        method=method,
        site="logits",
    )
    if logits.dim() != 3:
        raise ValueError(f"the model's outputs must be logits of shape (S, N, C), got {tuple(logits.shape)}")
    return logits.softmax(-1)


def predictive_regression(
    model,
    guide=None,
    x=None,
    *,
    num_samples: Optional[int] = None,
    batch_size: int = 500,
    sample_chunk: Optional[int] = None,
    samples: Optional[Mapping[str, torch.Tensor]] = None,
    seed: Optional[int] = None,
    method: str = "auto",
) -> dict:
    """Predicted means ``loc`` ``(S, N)`` and the noise scale of a regression model.

    Returns ``{"loc": (S, N), "noise_scale": tensor}`` where the noise scale
    is ``model.noise_scale()`` (a scalar for :class:`~pyro_bq.models.BayesianRegressor`).
    Feed it to :func:`~pyro_bq.uncertainty.decompose_regression`.

    Usage::

        pred = predictive_regression(model, guide, x, num_samples=200)
        parts = decompose_regression(pred["loc"], pred["noise_scale"])
    """
    if not hasattr(model, "noise_scale"):
        raise TypeError(f"model must be a regression model with noise_scale(), got {type(model).__name__}")
    loc = predictive_logits(
        model,
        guide,
        x,
        num_samples=num_samples,
        batch_size=batch_size,
        sample_chunk=sample_chunk,
        samples=samples,
        seed=seed,
        method=method,
        site="loc",
    )
    if loc.dim() == 3 and loc.shape[-1] == 1:
        loc = loc.squeeze(-1)
    return {"loc": loc, "noise_scale": model.noise_scale()}
