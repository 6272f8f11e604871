"""The Dirty-MNIST study command: end to end with tiny settings, resumption, bad input."""

import json
import math
import os

import arviz as az
import pytest

from pyro_bq.cli import main as cli_main
from pyro_bq.study import ALL_POLICIES, ROW_BUILDERS, StudyConfig
from pyro_bq.study.cli import main as study_main
from pyro_bq.study.report import COLUMNS

TINY = [
    "--mnist-limit", "600", "--amnist-train-images", "60", "--amnist-test-images", "30",
    "--amnist-fit-size", "600", "--amnist-vae-epochs", "1", "--eval-limit", "120", "--num-samples", "4",
    "--policies", "jq,logquant,qi", "--bits", "4", "--act-policies", "jq", "--logquant-steps", "3",
    "--arviz-samples", "4", "--arviz-limit", "30", "--no-progress", "--threads", "1",
]
EXPECTED_ROWS = ["float", "jq4", "jq4+act8", "logquant4", "qi", "float+3"]


@pytest.fixture(scope="module")
def tiny_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert cli_main(["study", "--data-dir", str(data_root), "--out-dir", str(out), *TINY]) == 0
    return out


def test_every_output_file_exists(tiny_run):
    out = tiny_run
    for name in ("results.md", "results.csv", "results.json", "uncertainty_densities.png", "reliability_float.png",
                 "metrics_vs_bits.png", "ambiguous_mnist_samples.png", "study_config.json"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in ("uncertainty_densities.png", "metrics_vs_bits.png", "ambiguous_mnist_samples.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for row in EXPECTED_ROWS:
        assert (out / "configs" / f"{row}.json").is_file()
        assert (out / "configs" / f"{row}.nc").is_file()
    assert len(list((out / "train").glob("*/guide.bq"))) == 1


def test_json_has_every_configuration_and_column_in_range(tiny_run):
    data = json.loads((tiny_run / "results.json").read_text())
    assert data["columns"] == list(COLUMNS)
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == EXPECTED_ROWS
    for name, r in rows.items():
        assert set(COLUMNS) <= set(r)
        for key in ("accuracy", "ece", "auroc_mi_fashion", "auroc_ee_ambiguous"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        assert r["nll"] > 0 and math.isfinite(r["nll"])
        assert r["packed_bytes"] > 0
    assert rows["float"]["bits_per_param"] == pytest.approx(64.0)
    assert 4.0 < rows["jq4"]["bits_per_param"] < 16.0
    assert rows["jq4"]["packed_bytes"] < rows["float"]["packed_bytes"] / 3
    assert rows["jq4+act8"]["act_bits"] == 8 and rows["jq4"]["act_bits"] is None
    # by default the first and last layers stay at 8 bits (--ends-bits)
    extra = json.loads((tiny_run / "configs" / "jq4.json").read_text())["row"]["extra"]
    assert extra["ends_bits"] == 8
    assert extra["end_sites"] == ["net.conv1.bias", "net.conv1.weight", "net.fc3.bias", "net.fc3.weight"]
    # the Markdown and CSV tables carry the same configurations
    md = (tiny_run / "results.md").read_text()
    assert all(f"| {name} |" in md for name in EXPECTED_ROWS)
    csv_lines = (tiny_run / "results.csv").read_text().strip().splitlines()
    assert csv_lines[0].split(",") == [*COLUMNS, "error"] and len(csv_lines) == 1 + len(EXPECTED_ROWS)
    # rows the run was not asked for are not in the table, and no row failed
    assert "pwfn" not in rows and data["errors"] == {}
    assert all(r["error"] is None for r in data["rows"])
    assert data["ambiguous_mnist"]["source"] == "generated"


def test_rows_carry_training_labels_draw_figures_and_allocation_bits(tiny_run):
    data = json.loads((tiny_run / "results.json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert {name: r["training"] for name, r in rows.items()} == {
        "float": "data-free", "jq4": "data-free", "jq4+act8": "data-free", "logquant4": "trained", "qi": "data-free",
        "float+3": "trained"}
    for name, r in rows.items():
        assert r["mi_in"] > 0 and r["mi_in"] == r["details"]["epistemic_in"], name
        assert 0.0 <= r["varying_fraction"] <= 1.0 and isinstance(r["collapsed"], bool), name
        assert len(r["details"]["varying_fraction_sites"]) == 10, name  # LeNet-5: 5 layers, weight and bias
        assert r["collapsed"] == bool(r["details"]["deterministic_sites"] or r["varying_fraction"] < 0.01)
        assert r["stochastic_fraction"] == 0.0, name  # every row rounds its draws to nearest (or keeps them float)
    assert rows["float"]["varying_fraction"] == 1.0 and not rows["float"]["collapsed"]
    assert rows["jq4"]["code_bits"] is None  # allocation rows only
    md = (tiny_run / "results.md").read_text()
    assert "| training |" in md and "| data-free |" in md and "| trained |" in md
    header = (tiny_run / "results.csv").read_text().splitlines()[0].split(",")
    assert {"training", "mi_in", "varying_fraction", "collapsed", "code_bits", "storage_bits"} <= set(header)


def test_the_tables_render_allocation_bits_when_present_and_blank_otherwise():
    from pyro_bq.study.report import markdown_table

    base = {"config": "qi", "policy": "qi", "training": "data-free", "collapsed": True}
    table = markdown_table([{**base, "code_bits": 2.52, "storage_bits": 6.5}, {**base, "config": "jq4"}])
    qi, jq = table.splitlines()[2:]
    assert "| 2.52 | 6.50 |" in qi and jq.endswith("|  |  |") and "**yes**" in jq


def test_arviz_inference_data_per_configuration(tiny_run):
    idata = az.from_netcdf(tiny_run / "configs" / "jq4.nc")
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data"} <= set(idata.groups())
    assert idata.posterior.sizes["draw"] == 4
    assert idata.observed_data["obs"].shape == (30,)


def test_rerun_skips_finished_work(tiny_run, data_root, caplog):
    out = tiny_run
    guide_file = next((out / "train").glob("*/guide.bq"))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "configs").iterdir()}
    guide_mtime = guide_file.stat().st_mtime_ns
    caplog.set_level("INFO", logger="pyro_bq.study")
    assert study_main(["--data-dir", str(data_root), "--out-dir", str(out), *TINY]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "configs").iterdir()}
    assert after == before  # no configuration re-evaluated
    assert guide_file.stat().st_mtime_ns == guide_mtime  # no re-training
    assert any("6 finished configuration(s) skipped" in r.getMessage() for r in caplog.records)
    # a removed row is redone, and only that one
    (out / "configs" / "jq4.json").unlink()
    assert study_main(["--data-dir", str(data_root), "--out-dir", str(out), *TINY]) == 0
    redone = {p.name: p.stat().st_mtime_ns for p in (out / "configs").iterdir()}
    assert redone["float.json"] == before["float.json"] and redone["jq4.nc"] != before["jq4.nc"]
    assert json.loads((out / "results.json").read_text())["rows"][1]["config"] == "jq4"


def _failing_run(tiny_run, data_root, out, *extra):
    """The tiny run's data cache and trained guide, one JQ row whose builder raises."""
    guide = next((tiny_run / "train").glob("*/guide.bq"))
    args = [*TINY, "--policies", "jq", "--act-policies", "", "--cache-dir", str(tiny_run / "cache"),
            "--checkpoint", str(guide), *extra]
    return study_main(["--data-dir", str(data_root), "--out-dir", str(out), *args])


def _boom(ctx, spec):
    raise RuntimeError(f"no guide for {spec.name}")


def test_a_failing_row_fails_the_study(tiny_run, data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(ROW_BUILDERS, "jq", _boom)
    with pytest.raises(RuntimeError, match="no guide for jq4") as exc:
        _failing_run(tiny_run, data_root, tmp_path)
    assert any("jq4" in note and "--keep-going" in note for note in exc.value.__notes__)
    assert not (tmp_path / "results.md").exists()


def test_keep_going_records_the_error_of_a_failing_row(tiny_run, data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(ROW_BUILDERS, "jq", _boom)
    assert _failing_run(tiny_run, data_root, tmp_path, "--keep-going") == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["float", "jq4"]
    assert rows["jq4"]["error"] == "RuntimeError: no guide for jq4" and rows["jq4"]["accuracy"] is None
    assert rows["float"]["error"] is None and 0.0 <= rows["float"]["accuracy"] <= 1.0
    assert data["errors"] == {"jq4": "RuntimeError: no guide for jq4"}
    assert "- `jq4`: RuntimeError: no guide for jq4" in (tmp_path / "results.md").read_text()
    assert "RuntimeError: no guide for jq4" in (tmp_path / "results.csv").read_text().splitlines()[2]
    assert not (tmp_path / "configs" / "jq4.json").exists()  # a re-run tries the row again


def test_every_policy_has_a_row_builder():
    assert set(ROW_BUILDERS) == set(ALL_POLICIES)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--policies", "jq,nosuch"], "unknown policy 'nosuch'"),
        (["--bits", "4,0"], "bits must be an int from 1 to 16, got 0"),
        (["--bits", "17"], "bits must be an int from 1 to 16, got 17"),
        (["--act-bits", "32"], "act_bits must be an int from 1 to 16, got 32"),
        (["--bits", "four"], "comma-separated integers"),
    ],
)
def test_bad_arguments_give_a_clear_error(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        study_main(["--out-dir", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_out_dir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        study_main(["--out-dir", str(blocker)])
    assert "--out-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study_main(["--out-dir", str(blocker / "below")])
    assert "cannot be created" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(SystemExit):
            study_main(["--out-dir", str(ro)])
        assert "not writable" in capsys.readouterr().err


def test_study_config_validation_names_the_argument():
    with pytest.raises(ValueError, match="policies"):
        StudyConfig(policies=("jq", "fp4"))
    with pytest.raises(ValueError, match="bits"):
        StudyConfig(bits=(8, 0))
    with pytest.raises(ValueError, match="bits"):
        StudyConfig(bits=())
    with pytest.raises(TypeError, match="seed"):
        StudyConfig(seed=1.5)
    with pytest.raises(ValueError, match="ends_bits"):
        StudyConfig(ends_bits=40)
    with pytest.raises(ValueError, match="amnist_source"):
        StudyConfig(amnist_source="web")
    cfg = StudyConfig(policies="JQ", bits=(3, 4, 4), act_policies=())
    assert cfg.policies == ("float", "jq") and cfg.bits == (4, 3)
    assert [r.name for r in cfg.rows()] == ["float", "jq4", "jq3"]
    # every default row is named once
    names = [r.name for r in StudyConfig().rows()]
    assert len(names) == len(set(names)) and "jq4+act8" in names and "logquant4" in names


def test_pyro_bq_cli_rejects_unknown_commands(capsys):
    with pytest.raises(SystemExit):
        cli_main(["stduy"])
    assert "invalid choice" in capsys.readouterr().err
    assert cli_main([]) == 2


def test_the_row_format_is_part_of_the_eval_fingerprint(monkeypatch):
    from pyro_bq.study import config

    cfg = StudyConfig()
    before = cfg.eval_fingerprint(), cfg.train_fingerprint()
    monkeypatch.setattr(config, "ROW_FORMAT", config.ROW_FORMAT + 1)
    assert cfg.eval_fingerprint() != before[0]  # rows of another record format run again
    assert cfg.train_fingerprint() == before[1]  # the trained guide is still reused
