"""Data-parallel SVI on torch.distributed (gloo, CPU), on a real MNIST subset.

The 2-process runs go through the real entry point ``examples/train_distributed.py``
(via ``tests/dist_worker.py``, which only adds fault injection), launched by
``torchrun`` or by spawning one process per rank with torchrun's environment
variables. The 1-process reference runs the same entry point in this process.

Noise is fixed by making it negligible: the guide starts with every posterior
scale at ``1e-8`` and trains with plain SGD, whose KL gradient moves the raw
scales by only ``lr`` per step, so the weight noise ``scale * eps`` (different
eps on each rank) stays ~1e-9 relative and below float32 round-off. SGD, not
Adam, because Adam's update is nearly invariant to a constant gradient factor
and would hide a summed (instead of averaged) gradient.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_bq.inference import fit_svi
from pyro_bq.inference.distributed import (
    DistributedError,
    init_distributed,
    rank_seed,
    shard_batch,
)
from pyro_bq.io import latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
PYTHON = sys.executable
TORCHRUN = shutil.which("torchrun", path=str(Path(PYTHON).parent)) or "torchrun"

# float32 round-off of a reduction split in two: observed max |delta loc| ~ 1e-7 after 6 steps
LOC_ATOL = 1e-5
FAULTS = ("sum", "local-size")
STEPS = 6  # 175 images, global batch 50: batches 50, 50, 50, 25 (shards 13/12), so 6 steps cross an epoch


def _args(data_root, out, *extra, steps=STEPS):
    return [
        "--data-dir", str(data_root), "--net", "mlp", "--hidden", "64", "--train-size", "175",
        "--batch-size", "50", "--optim", "sgd", "--lr", "1e-3", "--init-scale", "1e-8",
        "--num-steps", str(steps), "--seed", "3", "--no-progress", "--timeout", "60",
        "--out", str(out), *map(str, extra),
    ]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


_USED_PORTS: set = set()


def _free_port() -> int:
    """A free loopback port not handed out before in this session (jobs start concurrently)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _USED_PORTS:
            _USED_PORTS.add(port)
            return port


def _torchrun_start(nproc, args):
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(WORKER), *args]
    return [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)]


def _start(world, args):
    """One process per rank, with the environment torchrun would give them (static rendezvous)."""
    port = _free_port()
    return [
        subprocess.Popen(
            [PYTHON, str(WORKER), *args],
            env=_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for r in range(world)
    ]


def _wait(procs, timeout=240):
    """``(returncode, stdout, stderr)`` of each process; kills them all after ``timeout`` s."""
    outs = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _reference(data_root, out, steps=STEPS):
    """The 1-process run: the same entry point, in this process (no process group)."""
    from dist_worker import run

    threads = torch.get_num_threads()
    try:
        return run(_args(data_root, out, steps=steps))
    finally:
        torch.set_num_threads(threads)


def _guide(path):
    return load_checkpoint(path)["guide"]


def _max_loc_diff(a, b):
    return float((_guide(a)["loc"] - _guide(b)["loc"]).abs().max())


@pytest.fixture(scope="module", autouse=True)
def _worker_on_path():
    sys.path.insert(0, str(REPO / "tests"))
    yield
    sys.path.remove(str(REPO / "tests"))


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    _reference(data_root, folder / "ref.bq")
    return folder / "ref.bq"


class _Job:
    """Processes started at once; :meth:`result` waits for them (once) and returns their outputs."""

    def __init__(self, procs, timeout=300, **paths):
        self.procs, self.timeout, self.paths, self._outs = procs, timeout, paths, None

    def result(self):
        if self._outs is None:
            self._outs = _wait(self.procs, self.timeout)
        return self._outs

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


NAN_IMAGE = 0  # the training image the "nan" fault poisons


@pytest.fixture(scope="module")
def launches(data_root, tmp_path_factory):
    """Every multi-process job of this module, started together: on this shared 2-core
    machine they spend most of their time importing torch, so overlapping them saves
    minutes. Each test then waits for its own job, with a subprocess timeout."""
    folder = tmp_path_factory.mktemp("launches")
    jobs = {}
    # the main run: 2 gloo processes through torchrun, checkpointing every 3 steps
    jobs["two"] = _Job(
        _torchrun_start(2, _args(data_root, folder / "two.bq", "--checkpoint-dir", folder / "ckpt", "--checkpoint-every", 3)),
        out=folder / "two.bq", ckpt=folder / "ckpt",
    )
    for fault in FAULTS:
        jobs[fault] = _Job(_start(2, _args(data_root, folder / f"{fault}.bq", "--fault", fault)), out=folder / f"{fault}.bq")
    # rank 1 SIGKILLs itself after step 2 of 50; the process group's timeout is 20 s
    jobs["killed"] = _Job(
        _start(2, _args(data_root, folder / "killed.bq", "--die-at-step", 2, "--die-rank", 1, "--timeout", 20, steps=50)),
        timeout=150,
    )
    start = time.monotonic()
    yield jobs, start
    for job in jobs.values():
        job.kill()


# -- pure functions --------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(50, 2), (25, 2), (7, 3), (2, 4), (128, 8)])
def test_shards_are_disjoint_cover_the_batch_and_weights_sum_to_one(n, world):
    idx = torch.randperm(1000)[:n]
    shards = [shard_batch(idx, r, world) for r in range(world)]
    real = [s for s, w in shards if w > 0]
    assert torch.equal(torch.cat(real), idx)  # disjoint, in order, covering the global batch
    assert sum(w for _, w in shards) == pytest.approx(1.0)
    for local, w in shards:
        assert w == pytest.approx(len(local) / n) or (w == 0 and len(local) == 1)
        assert abs(len(local) - n / world) < 1 or w == 0


def test_shard_batch_and_rank_seed_validate_arguments():
    with pytest.raises(ValueError, match="rank"):
        shard_batch(torch.arange(4), 2, 2)
    with pytest.raises(ValueError, match="indices"):
        shard_batch(torch.arange(0), 0, 2)
    with pytest.raises(TypeError, match="world_size"):
        shard_batch(torch.arange(4), 0, 2.0)
    assert rank_seed(5, 0) == 5
    seeds = {rank_seed(5, r) for r in range(8)}
    assert len(seeds) == 8 and rank_seed(5, 3) == rank_seed(5, 3)


def test_init_and_fit_svi_validate_distributed_arguments(mnist_small, monkeypatch):
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="backend"):
        init_distributed("mpi")
    with pytest.raises(ValueError, match="timeout"):
        init_distributed(timeout=0)
    info = init_distributed()  # no torchrun environment: one process, nothing initialised
    assert (info.rank, info.world_size, info.distributed) == (0, 1, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed()
    monkeypatch.delenv("WORLD_SIZE")

    from pyro_bq import IIDNormal
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.models import MLP, BayesianClassifier

    train = mnist_small[0].subset(20)
    model = BayesianClassifier(MLP((784, 8, 10)), IIDNormal(1.0), dataset_size=20)
    guide = AutoMeanFieldNormal(model)
    with pytest.raises(TypeError, match="distributed"):
        fit_svi(model, guide, train, num_steps=1, progress=False, distributed="yes")
    with pytest.raises(ValueError, match="distributed=True"):
        fit_svi(model, guide, train, num_steps=1, progress=False, distributed=True)


# -- 2 processes == 1 process on the global batch ------------------------------------------


def test_two_gloo_processes_match_one_process(launches, reference):
    job = launches[0]["two"]
    ((rc, stdout, stderr),) = job.result()
    assert rc == 0, stderr[-4000:]
    assert "world_size=2 backend=gloo" in stdout
    two = load_checkpoint(job.paths["out"])
    ref = load_checkpoint(reference)
    assert two["world_size"] == 2 and two["steps"] == ref["steps"] == STEPS
    diff = _max_loc_diff(job.paths["out"], reference)
    assert diff <= LOC_ATOL, diff
    # the scales moved by the same (tiny) KL steps: identical up to round-off
    torch.testing.assert_close(two["guide"]["scale_raw"], ref["guide"]["scale_raw"], rtol=0, atol=1e-6)
    # the reported loss is the global batch's loss, as in one process
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    # only rank 0 writes checkpoints and logs
    assert [p.name for p in job.paths["ckpt"].iterdir()] == [f"ckpt-{STEPS}.bq"]
    assert stdout.count("world_size=") == 1


@pytest.mark.parametrize("fault", FAULTS)
def test_mis_scaled_gradients_are_detected(launches, reference, fault):
    """Summing the ranks' gradients, or scaling each rank's likelihood to its shard
    size, breaks the equality checked above by orders of magnitude more than LOC_ATOL."""
    job = launches[0][fault]
    results = job.result()
    assert [rc for rc, _, _ in results] == [0, 0], results
    diff = _max_loc_diff(job.paths["out"], reference)
    assert diff > 100 * LOC_ATOL, diff


# -- failure of a rank ----------------------------------------------------------------------


def test_a_killed_rank_makes_the_other_fail_cleanly_not_hang(launches):
    (rc0, out0, err0), (rc1, _, err1) = launches[0]["killed"].result()  # subprocess timeout: 150 s
    assert rc1 == -9, err1  # SIGKILL
    assert rc0 not in (0, None), (rc0, err0)
    assert "DistributedError" in err0 and "rank 0 of 2" in err0, err0[-3000:]
    assert "world_size=" not in out0  # it did not finish


@pytest.mark.slow
def test_a_rank_that_never_comes_times_out(data_root, tmp_path):
    """Rank 1 never starts: rank 0 gives up after its 3 s rendezvous timeout."""
    port = _free_port()
    job = _Job(
        [
            subprocess.Popen(
                [PYTHON, str(WORKER), *_args(data_root, tmp_path / "alone.bq", "--timeout", 3)],
                env=_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            )
        ],
        timeout=120,
    )
    ((rc, _, err),) = job.result()
    assert rc != 0
    assert "timeout" in err.lower() or "timed out" in err.lower(), err[-3000:]


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_at_the_same_step(data_root, tmp_path, mnist_small):
    """One image is NaN: whichever rank holds it, the all-reduced loss is NaN on every
    rank, so both raise NonFiniteError at the same step and rank 0 saves the last good state."""
    job = _Job(_start(2, _args(data_root, tmp_path / "nan.bq", "--fault", "nan", "--checkpoint-dir", tmp_path / "ckpt", steps=4)))
    results = job.result()
    order = mnist_small[0].subset(175).epoch_order(0, 3)
    step = int((order == NAN_IMAGE).nonzero()) // 50
    assert step < 4
    for rc, _, err in results:
        assert rc != 0
        assert f"NonFiniteError: step {step}: the loss is not finite" in err, err[-3000:]
    saved = latest_checkpoint(tmp_path / "ckpt")
    assert saved is not None and load_checkpoint(saved)["step"] == step


# -- checkpoints --------------------------------------------------------------------------


def test_a_two_process_checkpoint_resumes_in_one_process(launches, data_root, tmp_path):
    """Resume the 2-process checkpoint of step 6 in 1 process up to step 10: the same
    parameters as 10 uninterrupted single-process steps, within the same tolerance."""
    job = launches[0]["two"]
    assert job.result()[0][0] == 0
    ckpt = tmp_path / "ckpt"
    shutil.copytree(job.paths["ckpt"], ckpt)
    state = load_checkpoint(latest_checkpoint(ckpt))
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2 and state["step"] == STEPS
    summary = _resume_one(data_root, tmp_path / "resumed.bq", ckpt, steps=10)
    assert summary["resumed_from"].endswith(f"ckpt-{STEPS}.bq") and summary["steps"] == 10
    _reference(data_root, tmp_path / "ref10.bq", steps=10)
    assert _max_loc_diff(tmp_path / "resumed.bq", tmp_path / "ref10.bq") <= LOC_ATOL
    assert len(load_checkpoint(tmp_path / "resumed.bq")["losses"]) == 10


def _resume_one(data_root, out, ckpt, steps):
    from dist_worker import run

    threads = torch.get_num_threads()
    try:
        return run(_args(data_root, out, "--checkpoint-dir", ckpt, "--checkpoint-every", 3, steps=steps))
    finally:
        torch.set_num_threads(threads)


def _max_state_diff(a, b):
    ga, gb = _guide(a), _guide(b)
    assert set(ga) == set(gb)
    return max(float((ga[k] - gb[k]).abs().max()) for k in ga)


@pytest.mark.slow
def test_resume_with_the_same_ranks_continues_and_from_one_process_in_two(data_root, tmp_path):
    """(1) A 2-process run stopped at step 3 and resumed by 2 processes to step 6 ends where an
    uninterrupted 2-process run ends (max |delta| <= 1e-6). Here the posterior scales start at
    1e-2, so the weight noise matters: a 1-process run differs by far more, hence the match
    shows that each rank's RNG state was restored. (2) A 1-process checkpoint of step 3
    resumed by 2 processes matches 6 single-process steps within LOC_ATOL."""
    noisy = ("--init-scale", "1e-2")
    whole = _Job(_start(2, _args(data_root, tmp_path / "whole.bq", *noisy)))
    first = _Job(_start(2, _args(data_root, tmp_path / "a3.bq", "--checkpoint-dir", tmp_path / "a", *noisy, steps=3)))
    from dist_worker import run

    threads = torch.get_num_threads()
    try:
        run(_args(data_root, tmp_path / "noisy1.bq", *noisy))
        run(_args(data_root, tmp_path / "ref6.bq"))
        run(_args(data_root, tmp_path / "b3.bq", "--checkpoint-dir", tmp_path / "b", steps=3))
    finally:
        torch.set_num_threads(threads)
    assert [r[0] for r in first.result()] == [0, 0], first.result()
    second = _Job(_start(2, _args(data_root, tmp_path / "a6.bq", "--checkpoint-dir", tmp_path / "a", *noisy)))
    from_one = _Job(_start(2, _args(data_root, tmp_path / "b6.bq", "--checkpoint-dir", tmp_path / "b")))
    for job in (whole, second, from_one):
        assert [r[0] for r in job.result()] == [0, 0], job.result()
    resumed, uninterrupted = load_checkpoint(tmp_path / "a6.bq"), load_checkpoint(tmp_path / "whole.bq")
    assert resumed["resumed_from"].endswith("ckpt-3.bq")
    resume_delta = _max_state_diff(tmp_path / "a6.bq", tmp_path / "whole.bq")
    noise_delta = _max_state_diff(tmp_path / "noisy1.bq", tmp_path / "whole.bq")
    assert resume_delta <= 1e-6, (resume_delta, resumed["losses"], uninterrupted["losses"])
    assert noise_delta > 1e-4, noise_delta
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(uninterrupted["losses"]), rtol=1e-6, atol=0)
    b6 = load_checkpoint(tmp_path / "b6.bq")
    assert b6["resumed_from"].endswith("ckpt-3.bq") and b6["world_size"] == 2
    assert _max_loc_diff(tmp_path / "b6.bq", tmp_path / "ref6.bq") <= LOC_ATOL


@pytest.mark.slow
def test_a_stock_pyro_autodelta_guide_trains_the_same_in_two_processes(data_root, tmp_path):
    """Stock ``pyro.infer.autoguide.AutoDelta`` (MAP: no noise at all; one lazily created
    parameter per site, initialised from random prior draws that differ per rank until
    fit_svi broadcasts rank 0's) needs no change either: 2 processes match 1.

    (Stock AutoNormal is not used for this check: with scales of 1e-8 its auxiliary-site
    Monte Carlo KL cancels terms of size eps/scale ~ 1e8 in float32, so even one process's
    gradient is off by ~10; with larger scales the per-rank noise no longer cancels.)"""
    job = _Job(_start(2, _args(data_root, tmp_path / "two.bq", "--guide", "autodelta")))
    from dist_worker import run

    threads = torch.get_num_threads()
    try:
        run(_args(data_root, tmp_path / "one.bq", "--guide", "autodelta"))
    finally:
        torch.set_num_threads(threads)
    assert [r[0] for r in job.result()] == [0, 0], job.result()
    one = _guide(tmp_path / "one.bq")
    assert set(one) == {f"net.{i}.{w}_unconstrained" for i in (1, 3) for w in ("weight", "bias")}
    assert _max_state_diff(tmp_path / "two.bq", tmp_path / "one.bq") <= LOC_ATOL
