"""fit_svi on any iterable of batches: a DataLoader, a list of (x, y) pairs, an InMemoryDataset; the dataset
size; resuming a DataLoader run at the right epoch and step; batch checks naming the batch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import BatchError, NonFiniteError, as_batches, fit_svi
from pyro_bq.io import latest_checkpoint, load_checkpoint
from pyro_bq.models import MLP, BayesianClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(n, seed=0, hidden=16):
    torch.manual_seed(seed)
    model = BayesianClassifier(MLP((784, hidden, 10)), IIDNormal(1.0), dataset_size=n)
    return model, AutoMeanFieldNormal(model, init_scale=1e-2)


def _fit(data, n, lr=3e-3, **kw):
    model, guide = _setup(n)
    result = fit_svi(model, guide, data, lr=lr, seed=5, progress=False, **kw)
    return result, guide


def test_a_shuffled_dataloader_over_2000_mnist_images_matches_the_in_memory_run_step_for_step(mnist_small):
    train = mnist_small[0]
    assert len(train) == 2000
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=128, shuffle=True)
    from_loader, guide_a = _fit(loader, len(train), lr=1e-2, num_epochs=2)
    in_memory, guide_b = _fit(train, len(train), lr=1e-2, num_epochs=2, batch_size=128)
    assert from_loader.steps == in_memory.steps == 2 * 16
    assert from_loader.losses == in_memory.losses  # same batches, same weight noise: bit for bit
    for k, v in guide_a.state_dict().items():
        assert torch.equal(v, guide_b.state_dict()[k]), k
    # per-example losses of full batches (the last batch of an epoch has 80 examples, and the KL weighs more there)
    first, last = sum(from_loader.losses[:3]) / 3, sum(from_loader.losses[-4:-1]) / 3
    assert last < 0.92 * first


def test_the_loader_is_left_as_it_was_and_its_order_is_a_function_of_seed_and_epoch(mnist_small):
    train = mnist_small[0].subset(300)
    generator = torch.Generator().manual_seed(123)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=100, shuffle=True, generator=generator)
    batches = as_batches(loader)
    epoch1 = [yb for _, _, yb in batches.epoch(1, seed=7)]
    again = [yb for _, _, yb in batches.epoch(1, seed=7)]
    other = [yb for _, _, yb in batches.epoch(2, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(epoch1, again))
    assert not all(torch.equal(a, b) for a, b in zip(epoch1, other))
    assert loader.sampler.generator is generator
    expected = train.y[train.epoch_order(1, 7)]
    assert torch.equal(torch.cat(epoch1), expected)
    skipped = [yb for _, _, yb in batches.epoch(1, seed=7, skip=2)]
    assert len(skipped) == 1 and torch.equal(skipped[0], epoch1[2])


def test_a_list_of_batches_needs_a_dataset_size_only_when_the_model_cannot_tell(mnist_small):
    train = mnist_small[0].subset(200)
    pairs = list(train.batches(50))
    result, _ = _fit(pairs, len(train), num_epochs=2)
    assert result.steps == 8
    assert as_batches(pairs).dataset_size is None
    with pytest.raises(ValueError, match="dataset_size="):
        as_batches(pairs).require_size("fit_svi")
    assert as_batches(pairs, dataset_size=200).require_size("fit_svi") == 200
    model, guide = _setup(len(train))
    with pytest.raises(ValueError, match="dataset_size=999 but the model was built with dataset_size=200"):
        fit_svi(model, guide, pairs, dataset_size=999, num_steps=1, progress=False)


def test_the_dataset_size_comes_from_len_of_the_loaders_dataset():
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    assert as_batches(DataLoader(TensorDataset(x, y), batch_size=8)).dataset_size == 30

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    stream = DataLoader(Stream(), batch_size=8)
    assert as_batches(stream).dataset_size is None
    assert as_batches(stream, dataset_size=30).dataset_size == 30
    with pytest.raises(ValueError, match="pass dataset_size="):
        as_batches(stream).require_size("fit_svi")


def test_num_epochs_over_data_without_a_length_asks_for_num_steps(mnist_small):
    train = mnist_small[0].subset(100)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(train.x, train.y))

    model, guide = _setup(100)
    with pytest.raises(ValueError, match="num_steps"):
        fit_svi(model, guide, DataLoader(Stream(), batch_size=25), num_epochs=1, progress=False)
    result = fit_svi(model, guide, DataLoader(Stream(), batch_size=25), num_steps=6, progress=False)
    assert result.steps == 6


def test_a_one_shot_iterator_and_other_objects_are_refused(mnist_small):
    train = mnist_small[0].subset(100)
    model, guide = _setup(100)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit_svi(model, guide, iter(list(train.batches(50))), num_steps=3, progress=False)
    with pytest.raises(TypeError, match="DataLoader"):
        fit_svi(model, guide, TensorDataset(train.x, train.y), num_steps=3, progress=False)
    with pytest.raises(TypeError, match=r"data is a tuple of tensors.*InMemoryDataset\(x, y\)"):
        fit_svi(model, guide, (train.x, train.y), num_steps=3, progress=False)
    flat = [(x.reshape(-1), y) for x, y in train.batches(50)][:1]  # x without a feature dimension
    with pytest.raises(BatchError, match="batch 0.*at least one feature dimension"):
        fit_svi(model, guide, [(flat[0][0][:50], flat[0][1])], num_steps=3, progress=False)


def _bad_batches(train, index, what):
    pairs = [(x.clone(), y.clone()) for x, y in train.batches(25)]
    x, y = pairs[index]
    if what == "nan":
        x[3, 0, 1, 1] = float("inf")
    elif what == "label":
        y[4] = 10
    elif what == "negative":
        y[0] = -1
    elif what == "shape":
        x = x[:, :, :27, :27]
    elif what == "rows":
        y = y[:-1]
    pairs[index] = (x, y)
    return pairs


@pytest.mark.parametrize("what, error, message", [
    ("nan", NonFiniteError, r"batch 2 of epoch 0: x holds NaN/inf values in row\(s\) \[3\]"),
    ("label", BatchError, r"batch 2 of epoch 0: labels y lie in \[0, 10\], outside \[0, 10\)"),
    ("negative", BatchError, r"batch 2 of epoch 0: labels y lie in \[-1, 9\]"),
    ("shape", BatchError, r"batch 2 of epoch 0 has x of shape \(25, 1, 27, 27\).*\(1, 28, 28\)"),
    ("rows", BatchError, r"batch 2 of epoch 0 has x of shape \(25, 1, 28, 28\) and y of shape \(24,\)"),
])
def test_a_malformed_batch_stops_the_run_naming_the_step_and_batch_after_saving_the_last_good_state(
        mnist_small, tmp_path, what, error, message):
    train = mnist_small[0].subset(100)
    model, guide = _setup(100)
    with pytest.raises(error, match="step 2: data: " + message):
        fit_svi(model, guide, _bad_batches(train, 2, what), num_epochs=1, checkpoint_dir=tmp_path, progress=False)
    assert latest_checkpoint(tmp_path).name == "ckpt-2.bq"


def test_batch_checks_need_one_synchronization_and_pass_healthy_batches(mnist_small):
    train = mnist_small[0].subset(100)
    batches = as_batches(list(train.batches(50)), num_classes=10)
    assert [i for i, _, _ in batches.epoch(0, seed=0)] == [0, 1]
    with pytest.raises(BatchError, match="labels y lie in"):
        list(as_batches(list(train.batches(50)), num_classes=3).epoch(0, seed=0))


def _loader(train):
    return DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True, generator=torch.Generator())


def test_a_dataloader_run_resumes_at_the_right_epoch_and_step_and_ends_as_an_uninterrupted_one(mnist_small, tmp_path):
    train = mnist_small[0].subset(300)  # 5 batches per epoch, the last one short
    whole, guide_whole = _fit(_loader(train), 300, num_epochs=3, checkpoint_dir=tmp_path / "a", checkpoint_every=4)
    part, _ = _fit(_loader(train), 300, num_steps=7, checkpoint_dir=tmp_path / "b", checkpoint_every=100)
    state = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert state["step"] == 7 and state["position"] == [1, 2]  # epoch 1, batch 2 comes next
    resumed, guide_resumed = _fit(_loader(train), 300, num_epochs=3, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from.endswith("ckpt-7.bq") and resumed.steps == whole.steps == 15
    assert resumed.losses == whole.losses
    for k, v in guide_whole.state_dict().items():
        assert torch.equal(v, guide_resumed.state_dict()[k]), k
