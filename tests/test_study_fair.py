"""The fair study: matched-budget baselines, several seeds, extra OOD sets, DDU sizes and noise."""

import json

import numpy as np
import pytest

from pyro_bq.study import ALL_POLICIES, StudyConfig
from pyro_bq.study.cli import build_parser, config_from_args
from pyro_bq.study.cli import main as study_main
from pyro_bq.study.config import TRAINED_FAMILIES
from pyro_bq.study.report import with_budget_deltas
from pyro_bq.study.seeds import summarize_seeds

TINY = [
    "--mnist-limit", "600", "--amnist-train-images", "60", "--amnist-test-images", "30",
    "--amnist-fit-size", "600", "--amnist-vae-epochs", "1", "--eval-limit", "120", "--num-samples", "4",
    "--bits", "4", "--act-policies", "", "--logquant-steps", "3",
    "--arviz-samples", "4", "--arviz-limit", "30", "--no-progress", "--threads", "1",
]


@pytest.mark.parametrize("settings", [{}, {"extra_steps": 7, "logquant_steps": 28}, {"logquant_steps": 400}])
def test_every_trained_row_has_a_matched_baseline_row(settings):
    cfg = StudyConfig(**settings)
    rows = cfg.rows()
    names = [r.name for r in rows]
    trained = [r for r in rows if r.training == "trained" and not r.is_baseline]
    assert {r.family for r in trained} == set(TRAINED_FAMILIES) & set(ALL_POLICIES)
    for spec in trained:
        base = cfg.baseline_of(spec)
        assert base is not None and base.name in names, spec.name
        assert base.steps == cfg.trained_steps(spec) and base.family == "float"
    # one baseline per distinct budget, and no baseline without a trained row
    budgets = {cfg.trained_steps(s) for s in trained}
    assert sorted(r.steps for r in rows if r.is_baseline) == sorted(budgets)


def test_table_deltas_are_the_difference_from_the_matched_baseline():
    rows = [{"config": "float+300", "accuracy": 0.98, "auroc_mi_fashion": 0.9, "auroc_ee_ambiguous": 0.95, "baseline": None},
            {"config": "logquant4", "accuracy": 0.985, "auroc_mi_fashion": 0.88, "auroc_ee_ambiguous": 0.96,
             "baseline": "float+300"},
            {"config": "jq4", "accuracy": 0.97, "baseline": None}]
    out = with_budget_deltas(rows)
    assert out[1]["d_accuracy"] == pytest.approx(0.005) and out[1]["d_auroc_mi_fashion"] == pytest.approx(-0.02)
    assert "d_accuracy" not in out[2] and "d_accuracy" not in rows[1]  # new rows; the input is untouched


def test_summary_has_mean_std_and_interval():
    per_seed = {0: [{"config": "float", "accuracy": 0.97}], 1: [{"config": "float", "accuracy": 0.99}],
                2: [{"config": "float", "accuracy": 0.98}, {"config": "jq4", "error": "boom"}]}
    (row,) = summarize_seeds(per_seed)
    assert row["accuracy"] == pytest.approx(0.98) and row["accuracy_std"] == pytest.approx(0.01)
    assert row["accuracy_ci95"] == pytest.approx(4.303 * 0.01 / 3 ** 0.5) and row["seeds"] == 3


def test_ddu_size_and_noise_reach_the_config_and_its_fingerprints(tmp_path):
    args = build_parser().parse_args(["--out-dir", str(tmp_path), "--amnist-size", "ddu", "--amnist-noise", "0.05"])
    cfg = config_from_args(args)
    assert (cfg.amnist_train_images, cfg.amnist_test_images, cfg.amnist_noise) == (6000, 6000, 0.05)
    base = StudyConfig(out_dir=str(tmp_path))
    assert StudyConfig(out_dir=str(tmp_path), amnist_noise=0.05).train_fingerprint() != base.train_fingerprint()
    (tmp_path / "ood").mkdir()
    np.savez(tmp_path / "ood" / "a.npz", x=np.zeros((3, 28, 28), np.uint8))
    with_ood = StudyConfig(out_dir=str(tmp_path), ood_dir=str(tmp_path / "ood"))
    fp = with_ood.eval_fingerprint()
    assert fp != base.eval_fingerprint()
    np.savez(tmp_path / "ood" / "a.npz", x=np.ones((3, 28, 28), np.uint8))  # same path, other contents
    assert with_ood.eval_fingerprint() != fp


def test_two_seeds_with_an_extra_ood_set(data_root, tmp_path):
    ood = tmp_path / "ood"
    ood.mkdir()
    rng = np.random.default_rng(0)
    np.savez(ood / "noise.npz", x=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8))
    out = tmp_path / "study"
    args = ["--data-dir", str(data_root), "--out-dir", str(out), "--policies", "jq,logquant", "--seeds", "0,1",
            "--ood-dir", str(ood), *TINY]
    assert study_main(args) == 0
    for k in (0, 1):
        seed_rows = json.loads((out / f"seed-{k}" / "results.json").read_text())["rows"]
        assert [r["config"] for r in seed_rows] == ["float", "jq4", "logquant4", "float+3"]
        assert all(0.0 <= r["auroc_mi_ood_noise"] <= 1.0 and 0.0 <= r["auroc_total_ood_noise"] <= 1.0 for r in seed_rows)
        assert (out / f"seed-{k}" / "ambiguous_quality.json").is_file()
    summary = json.loads((out / "results.json").read_text())
    assert "auroc_mi_ood_noise" in summary["columns"] and "auroc_total_ood_noise" in summary["columns"]
    rows = {r["config"]: r for r in summary["rows"]}
    assert rows["jq4"]["seeds"] == 2 and rows["jq4"]["accuracy_std"] >= 0.0 and rows["jq4"]["accuracy_ci95"] >= 0.0
    assert "auroc_mi_fashion_ci95" in (out / "results.csv").read_text().splitlines()[0]
    lq = rows["logquant4"]
    assert lq["baseline"] == "float+3" and lq["d_accuracy"] == pytest.approx(lq["accuracy"] - rows["float+3"]["accuracy"])
    md = (out / "results.md").read_text()
    assert "±" in md and "AUROC MI (MNIST vs noise)" in md
    assert (out / "metrics_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    # resumable per seed: a second run finishes every row from the files
    before = (out / "seed-1" / "configs" / "jq4.nc").stat().st_mtime_ns
    assert study_main(args) == 0
    assert (out / "seed-1" / "configs" / "jq4.nc").stat().st_mtime_ns == before


def test_bad_seeds_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study_main(["--out-dir", str(tmp_path), "--seeds", "1,1"])
    assert "--seeds" in capsys.readouterr().err
