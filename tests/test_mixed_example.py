"""The mixed-precision example on real MNIST: a tiny run (fast) and the accuracy floor (slow)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mixed_precision_mnist.py"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "allocate.py"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_tiny_run(data_root, tmp_path):
    ex = _load(EXAMPLE, "mixed_precision_mnist")
    argv = [
        "--data-root", str(data_root), "--checkpoint", str(tmp_path / "bnn.bq"), "--out", str(tmp_path / "out"),
        "--train-limit", "512", "--test-limit", "100", "--pretrain-epochs", "1", "--svi-epochs", "1",
        "--rb-steps", "50", "--smol-steps", "3", "--finetune-steps", "2", "--num-samples", "2",
        "--methods", "QIU,QINU,RB,SMOL,SMOL-L", "--target", "3.2",
    ]
    out = ex.main(ex.build_parser().parse_args(argv))
    methods = [r["method"] for r in out["records"]]
    assert methods == ["float", "QIU", "QINU", "RB", "SMOL", "SMOL-L"]
    for r in out["records"]:
        assert 0.0 <= r["accuracy_sampled"] <= 1.0 and 0.0 <= r["auroc_mi"] <= 1.0
        assert 0.0 <= r["accuracy_at_means"] <= 1.0
        assert 1.0 <= r["code_bits"] <= r["storage_bits"] <= 32.0
        assert r["training"] == ("data-free" if r["method"] in ("QIU", "QINU", "RB") else "trained")
    qiu = out["allocations"]["QIU"]
    assert qiu.code_bits <= 3.2 and len(qiu.info["validation_trials"]) > 1  # chosen on the validation split
    for name in ("bits.md", "results.md", "results.json", "bits.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "net.fc1.weight" in out["bits_table"] and "storage bits" in out["bits_table"]
    assert "accuracy_at_means" in out["results_table"] and "accuracy_sampled" in out["results_table"]
    # the second run reuses the cached BNN
    argv2 = argv[:argv.index("--methods")] + ["--methods", "QIU"]
    out2 = ex.main(ex.build_parser().parse_args(argv2))
    assert out2["records"][0]["accuracy"] == pytest.approx(out["records"][0]["accuracy"])


def test_benchmark_tiny_run():
    bench = _load(BENCH, "allocate_bench")
    rows = bench.main(bench.build_parser().parse_args(
        ["--nets", "lenet5", "--repeats", "1", "--rb-steps", "20", "--synthetic"]))
    assert {r["step"].split(" ")[0] for r in rows} >= {"baseline:", "QIU", "QINU", "RB"}
    assert all(r["seconds"] > 0 for r in rows)


@pytest.mark.slow
def test_lenet5_mixed_precision_floor(data_root, tmp_path):
    """QIU, QINU, RB and SMOL at ~3.2 mean bits stay within 1 point of the float BNN."""
    ex = _load(EXAMPLE, "mixed_precision_mnist")
    out = ex.main(ex.build_parser().parse_args([
        "--data-root", str(data_root), "--out", str(tmp_path), "--num-samples", "16", "--test-limit", "5000",
        "--methods", "QIU,QINU,RB,SMOL", "--smol-lam", "4e-6",
    ]))
    recs = {r["method"]: r for r in out["records"]}
    base = recs["float"]["accuracy_at_means"]
    for m in ("QIU", "QINU", "RB", "SMOL"):
        assert recs[m]["accuracy_at_means"] >= base - 0.01, (m, recs[m]["accuracy_at_means"], base)
        assert recs[m]["code_bits"] <= 4.0


def test_acceptance_benchmark_tiny_run(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bench = _load(BENCH.with_name("mixed_acceptance.py"), "mixed_acceptance")
    args = bench.build_parser().parse_args([
        "--data-root", str(data_root), "--train-limit", "400", "--val-size", "100", "--test-limit", "100",
        "--pretrain-epochs", "1", "--svi-epochs", "1", "--rb-steps", "20", "--smol-steps", "2",
        "--finetune-steps", "2", "--num-samples", "2", "--methods", "QIU,RB,SMOL", "--threads", str(__import__("torch").get_num_threads()),
    ])
    records = bench.main(args)
    assert [r["method"] for r in records] == ["float", "QIU", "RB", "SMOL"]
    for r in records[1:]:
        assert r["training"] == ("trained" if r["method"] == "SMOL" else "data-free")
        assert r["code_bits"] < r["storage_bits"]
    assert all(r["code_bits"] <= 3.2 for r in records[1:3])
    clip = _load(BENCH.with_name("mixed_clip.py"), "mixed_clip")
    out = clip.main(["--data-root", str(data_root), "--train-limit", "400", "--val-size", "100",
                     "--pretrain-epochs", "1", "--svi-epochs", "1"])
    assert set(out) == {"clip/site", "clip/module", "minmax/site", "minmax/module"}
