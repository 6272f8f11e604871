"""Errors that used to be silent, late or raw: each names the argument or input and says what to do."""

import importlib.util
import re
from pathlib import Path

import pyro
import pytest
import torch
from torch import nn

from pyro_bq import IIDNormal
from pyro_bq.data import InMemoryDataset
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import fit_svi
from pyro_bq.inference.prediction import auto_strategy, batched_forward, predict_batched
from pyro_bq.models import MLP, BayesianClassifier
from pyro_bq.uncertainty import evaluate, predictive_probs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quantize_mnist.py"


def _tiny():
    torch.manual_seed(0)
    data = InMemoryDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
    model = BayesianClassifier(MLP((6, 5, 3)), IIDNormal(1.0), dataset_size=len(data))
    return model, AutoMeanFieldNormal(model, init_scale=0.05), data


# -- (a) resuming past num_steps -----------------------------------------------------------------------
def test_resume_from_a_checkpoint_past_num_steps_is_refused(tmp_path):
    model, guide, data = _tiny()
    fit_svi(model, guide, data, num_steps=6, batch_size=10, checkpoint_dir=tmp_path, checkpoint_every=3,
            progress=False)
    pyro.clear_param_store()
    model, guide, data = _tiny()
    with pytest.raises(ValueError, match=r"at step 6, past this run's total of 3 steps.*num_steps >= 6"):
        fit_svi(model, guide, data, num_steps=3, batch_size=10, checkpoint_dir=tmp_path, progress=False)
    # the same number of steps resumes (nothing left to do), more steps continue
    assert fit_svi(model, guide, data, num_steps=6, batch_size=10, checkpoint_dir=tmp_path, progress=False).steps == 6
    assert fit_svi(model, guide, data, num_steps=8, batch_size=10, checkpoint_dir=tmp_path, progress=False).steps == 8


# -- (b) the example checks its options before any work -------------------------------------------------
def _example():
    spec = importlib.util.spec_from_file_location("quantize_mnist_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--bits", "0"], "--bits 0: bits must be an int from 1 to"),
    (["--bits", "4", "--qat-bits", "17"], "--qat-bits 17"),
    (["--num-samples", "0"], "--num-samples must be an int >= 1"),
    (["--lr", "-1"], "--lr must be a positive"),
    (["--table", "/no/such/folder/t.md"], "--table.*does not exist"),
])
def test_example_rejects_bad_options_before_loading_data(argv, message, monkeypatch, capsys):
    example = _example()

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the options were checked")

    monkeypatch.setattr(example, "load_mnist", refuse)
    monkeypatch.setattr(example, "load_fashion_mnist", refuse)
    with pytest.raises(SystemExit) as exit_info:
        example.main(argv + ["--quiet"])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    # a Namespace given to main directly is checked too
    args = example.parse_args(["--quiet"])
    args.bits = [0]
    with pytest.raises(ValueError, match="--bits 0"):
        example.main(args)


# -- (c) inputs of another dtype than the weights -----------------------------------------------------
def test_float64_inputs_give_a_type_error_naming_x_and_the_dtype():
    model, guide, data = _tiny()
    x = data.x[:4]
    guide(x)
    expected = r"x has dtype torch.float64 but the network's weights are torch.float32: pass x.to\(torch.float32\)"
    with pytest.raises(TypeError, match=expected):
        model(x.double())
    with pytest.raises(TypeError, match=expected):
        predict_batched(model, guide, x.double(), num_samples=2)
    with pytest.raises(TypeError, match=expected):
        predictive_probs(model, guide, x.double(), num_samples=2, seed=0)
    # a model built from a float64 network takes float64 inputs
    pyro.clear_param_store()
    model64 = BayesianClassifier(MLP((6, 5, 3)).double(), IIDNormal(1.0), dataset_size=40)
    guide64 = AutoMeanFieldNormal(model64, init_scale=0.05)
    guide64(x.double())
    assert predict_batched(model64, guide64, x.double(), num_samples=2).dtype == torch.float64


# -- (d) NaN inputs to evaluate -------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["in_data", "ood_data", "ambiguous_data"])
def test_nan_inputs_to_evaluate_name_the_dataset(where):
    model, guide, data = _tiny()
    guide(data.x[:4])
    bad = data.x[:8].clone()
    bad[5, 2] = float("nan")
    sets = {"in_data": (data.x[:8], data.y[:8]), "ood_data": data.x[8:16], "ambiguous_data": data.x[16:24]}
    sets[where] = (bad, data.y[:8]) if where == "in_data" else bad
    with pytest.raises(ValueError, match=rf"{where}.x holds NaN or infinite values in 1 of its 8 inputs "
                                         r"\(the first at row 5\).*drop or repair those inputs"):
        evaluate(model, guide, sets["in_data"], sets["ood_data"], ambiguous_data=sets["ambiguous_data"],
                 num_samples=2)


# -- (e) a network vmap cannot batch -------------------------------------------------------------------
class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


def test_a_bayesian_lstm_falls_back_to_the_loop_under_auto():
    model = BayesianClassifier(_LSTMNet(), IIDNormal(1.0), dataset_size=10, expose=lambda module, param: True)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    x = torch.randn(5, 7, 4)
    guide(x)
    draws = guide.sample_latents(3)
    assert "net.lstm.weight_ih_l0" in draws
    with pytest.raises(ValueError, match="strategy='vmap': torch.func.vmap cannot batch.*use strategy='loop' or 'auto'"):
        batched_forward(model, draws, x, strategy="vmap")
    with torch.no_grad():
        out = batched_forward(model, draws, x)
        loop = batched_forward(model, draws, x, strategy="loop")
    assert torch.equal(out, loop)
    assert auto_strategy(model, draws, x) == "loop"  # recorded for the model
    probs = predictive_probs(model, guide, x, num_samples=3, seed=0)  # method="auto" end to end
    assert probs.shape == (3, 5, 3) and torch.isfinite(probs).all()
