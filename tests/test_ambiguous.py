"""Ambiguous-MNIST: original files, the offline generator, its cache, and Dirty-MNIST."""

import json

import pytest
import torch

from pyro_bq.data import DirtyMNIST, dirty_mnist_test_sets, load_mnist
from pyro_bq.data.ambiguous import (
    AmbiguousConfig,
    generate_ambiguous_mnist,
    load_ambiguous_mnist,
    load_original_ambiguous_mnist,
    save_image_grid,
)

SMALL = dict(num_train_images=200, num_test_images=50, vae_train_size=10000, vae_epochs=3, ensemble_train_size=10000,
             ensemble_epochs=2)
TINY = dict(num_train_images=30, num_test_images=10, labels_per_image=4, vae_train_size=600, vae_epochs=1,
            ensemble_size=2, ensemble_train_size=600, candidate_factor=4)


@pytest.fixture(scope="module")
def small_gen(data_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("amnist_cache")
    return generate_ambiguous_mnist(data_root, cache, AmbiguousConfig(seed=0, **SMALL), progress=False), cache


def test_generated_set_is_really_ambiguous(small_gen):
    gen, _ = small_gen
    s = gen.stats
    # mean entropy of the labelling ensemble's prediction: Ambiguous vs real MNIST test digits
    assert s["ensemble_accuracy_mnist_test"] > 0.85
    assert s["mean_entropy_ambiguous"] >= 4.0 * s["mean_entropy_mnist"], s
    # low epistemic, high aleatoric: most of the total entropy is expected entropy
    assert s["mean_mutual_information_ambiguous"] < 0.25 * s["mean_expected_entropy_ambiguous"]
    # the 10 drawn labels disagree for most images (MNIST's single labels never do)
    labels = gen.train_labels
    for labels in (gen.train_labels, gen.test_labels):
        distinct = torch.tensor([len(torch.unique(row)) for row in labels])
        assert bool((distinct >= 2).all())  # no image's labels are unanimous
        assert labels.min() >= 0 and labels.max() <= 9
        # classes (each image's most frequent label) within a factor 2 of balanced
        counts = torch.bincount(torch.mode(labels, dim=1).values, minlength=10).float()
        share = len(labels) / 10
        assert float(counts.min()) >= share / 2 and float(counts.max()) <= 2 * share, counts


def test_quality_report_and_sample_page(small_gen, tmp_path):
    from pyro_bq.data.ambiguous import quality_report, write_quality_report

    gen, _ = small_gen
    report = quality_report(gen)
    assert report["fraction_unanimous"] == 0.0 and report["entropy_ratio"] >= 4.0
    assert sum(report["class_histogram_train"]) == 200 and sum(report["class_histogram_test"]) == 50
    lo, hi = report["class_share_range_train"]
    assert lo >= 0.5 and hi <= 2.0
    files = write_quality_report(gen, tmp_path / "out", pages=16)
    assert json.loads(open(files["ambiguous_quality"]).read()) == json.loads(json.dumps(report))
    assert open(files["ambiguous_grid"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_class_quotas_stay_within_the_ratio():
    from pyro_bq.data.ambiguous import _class_quotas

    quota = _class_quotas(torch.tensor([500, 500, 500, 15, 500, 500, 500, 500, 500, 500]), 300, 2.0)
    assert int(quota.sum()) == 300 and int(quota[3]) == 15 and int(quota.max()) <= 60
    with pytest.raises(ValueError, match="candidate_factor"):
        _class_quotas(torch.tensor([500, 500, 500, 14, 500, 500, 500, 500, 500, 500]), 300, 2.0)


def test_generated_shapes_ranges_and_flattened_dataset(small_gen):
    gen, _ = small_gen
    assert gen.train_images.shape == (200, 1, 28, 28) and gen.test_images.shape == (50, 1, 28, 28)
    assert gen.train_labels.shape == (200, 10) and gen.train_labels.dtype == torch.int64
    assert float(gen.train_images.min()) >= 0.0 and float(gen.train_images.max()) <= 1.0
    # train and test images are different images
    assert not any(torch.equal(gen.test_images[0], im) for im in gen.train_images)
    ds = gen.dataset(train=True)
    assert len(ds) == 2000 and ds.x.shape == (2000, 1, 28, 28)
    # image i is repeated once per label, in order, with MNIST's normalisation
    assert torch.allclose(ds.x[10:20], ((gen.train_images[1] - 0.1307) / 0.3081).expand(10, 1, 28, 28))
    assert torch.equal(ds.y[10:20], gen.train_labels[1])


def test_cache_hit_and_rebuild_when_manifest_changes(small_gen, data_root):
    gen, cache = small_gen
    again = generate_ambiguous_mnist(data_root, cache, AmbiguousConfig(seed=0, **SMALL), progress=False)
    assert again.from_cache and torch.equal(again.train_images, gen.train_images)
    manifest_file = next(cache.glob("*.manifest.json"))
    manifest = json.loads(manifest_file.read_text())
    assert manifest["config"]["seed"] == 0 and manifest["config"]["num_train_images"] == 200
    assert set(manifest["checksums"]) == {"train_images", "train_labels", "test_images", "test_labels"}
    # a manifest that no longer matches the data forces a rebuild
    manifest["checksums"]["train_labels"] = "0" * 64
    manifest_file.write_text(json.dumps(manifest))
    cfg = AmbiguousConfig(seed=0, **SMALL)
    from pyro_bq.data.ambiguous import _try_cache, _cache_paths

    assert _try_cache(*_cache_paths(cache, cfg), cfg) is None


def test_generator_is_deterministic_given_seed_and_seed_matters(data_root, tmp_path):
    a = generate_ambiguous_mnist(data_root, tmp_path / "a", AmbiguousConfig(seed=3, **TINY), progress=False)
    b = generate_ambiguous_mnist(data_root, tmp_path / "b", AmbiguousConfig(seed=3, **TINY), progress=False)
    assert not a.from_cache and not b.from_cache
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.manifest["checksums"] == b.manifest["checksums"]
    c = generate_ambiguous_mnist(data_root, tmp_path / "a", AmbiguousConfig(seed=4, **TINY), progress=False)
    assert not c.from_cache and not torch.equal(a.train_images, c.train_images)
    assert c.train_labels.shape == (30, 4)


def _write_original(folder, n_images=6200, k=10, shape=None, label_shape=None):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(shape or (n_images, 1, 28, 28), generator=g)
    labels = torch.randint(0, 10, label_shape or (n_images, k), generator=g)
    torch.save(samples, folder / "amnist_samples.pt")
    torch.save(labels, folder / "amnist_labels.pt")
    return samples, labels


def test_original_files_are_read_and_split(tmp_path):
    samples, labels = _write_original(tmp_path / "AmbiguousMNIST")
    train = load_original_ambiguous_mnist(tmp_path / "AmbiguousMNIST", train=True)
    test = load_original_ambiguous_mnist(tmp_path / "AmbiguousMNIST", train=False, normalize=False)
    assert len(train) == 60000 and len(test) == 62000 - 60000
    assert torch.allclose(train.x[25], (samples[2] - 0.1307) / 0.3081)
    assert int(train.y[25]) == int(labels[2, 5])
    assert torch.equal(test.x[0], samples[6000]) and int(test.y[3]) == int(labels[6000, 3])
    # "auto" prefers the original files found under ROOT/AmbiguousMNIST
    auto = load_ambiguous_mnist(tmp_path, train=False, normalize=False, cache_dir=tmp_path / "c")
    assert torch.equal(auto.x, test.x)


@pytest.mark.parametrize(
    "shape,label_shape,match",
    [
        ((50, 3, 28, 28), (50, 10), "amnist_samples.pt must have shape"),
        ((50, 1, 32, 32), (50, 10), "amnist_samples.pt must have shape"),
        ((50, 1, 28, 28), (49, 10), "amnist_labels.pt must have shape"),
        ((50, 1, 28, 28), (50, 10, 2), "amnist_labels.pt must have shape"),
    ],
)
def test_original_files_with_wrong_shapes_give_a_clear_error(tmp_path, shape, label_shape, match):
    _write_original(tmp_path, shape=shape, label_shape=label_shape)
    with pytest.raises(ValueError, match=match):
        load_original_ambiguous_mnist(tmp_path)


def test_original_files_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="amnist_samples.pt"):
        load_original_ambiguous_mnist(tmp_path)
    _write_original(tmp_path, n_images=100)  # 1,000 rows: no test split
    with pytest.raises(ValueError, match="no test split"):
        load_original_ambiguous_mnist(tmp_path)
    torch.save({"not": "a tensor"}, tmp_path / "amnist_labels.pt")
    with pytest.raises(ValueError, match="one tensor"):
        load_original_ambiguous_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="original Ambiguous-MNIST"):
        load_ambiguous_mnist(tmp_path / "nowhere", source="original")
    with pytest.raises(ValueError, match="source"):
        load_ambiguous_mnist(tmp_path, source="made-up")


@pytest.mark.parametrize(
    "field,value",
    [("num_train_images", 0), ("labels_per_image", 0), ("ensemble_size", 1), ("max_mi_quantile", 0.0), ("interpolation_fraction", 1.5)],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AmbiguousConfig(**{field: value})
    with pytest.raises(TypeError, match="seed"):
        AmbiguousConfig(seed="0")


def test_unwritable_cache_dir_is_refused(tmp_path, data_root):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cache_dir"):
        generate_ambiguous_mnist(data_root, blocker / "sub", AmbiguousConfig(**TINY), progress=False)


def test_dirty_mnist_train_and_test_sets(small_gen, data_root):
    _, cache = small_gen
    cfg = AmbiguousConfig(seed=0, **SMALL)
    train = DirtyMNIST(data_root, train=True, cache_dir=cache, config=cfg, mnist_limit=500, progress=False)
    assert len(train) == 500 + 2000 and train.num_mnist == 500 and train.num_ambiguous == 2000
    assert int(train.is_ambiguous.sum()) == 2000 and not bool(train.is_ambiguous[:500].any())
    mnist = load_mnist(data_root, train=True)
    # the MNIST rows are real MNIST rows (a seeded subset)
    assert bool((mnist.x.flatten(1) == train.x[0].flatten()).all(1).any())
    sets = dirty_mnist_test_sets(data_root, cache_dir=cache, config=cfg, limit=300, progress=False)
    assert list(sets) == ["mnist", "ambiguous", "fashion"]
    assert [len(v) for v in sets.values()] == [300, 300, 300]
    assert all(v.x.shape[1:] == (1, 28, 28) for v in sets.values())


def test_image_grid_png(small_gen, tmp_path):
    gen, _ = small_gen
    path = save_image_grid(gen.train_images[:32], tmp_path / "grid.png", labels=gen.train_labels[:32])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="images"):
        save_image_grid(torch.zeros(3, 28, 28), tmp_path / "bad.png")
