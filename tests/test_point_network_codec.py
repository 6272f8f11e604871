"""An entropy-coded PWFN point network: as small as its weight-space entropy, read back exactly."""

import math

import pytest
import torch

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoPWFN, init_to_pretrained
from pyro_bq.io import CorruptFileError
from pyro_bq.io.container import read_container, write_container
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.pwfn import ClusterConfig, cluster_guide_, load_point_network, point_network_bits_per_param, \
    save_point_network, weight_entropy
from pyro_bq.pwfn.export import POINT_KIND


@pytest.fixture(scope="module")
def fixed_lenet():
    torch.manual_seed(3)
    net = LeNet5()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=100)
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    guide(torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,)))
    for p in (0.5, 0.9, 1.0):
        cluster_guide_(guide, p, ClusterConfig(max_order=1))
    return guide


@pytest.mark.parametrize("codec", ["ans", "lzma", "zlib"])
def test_coded_point_network_reads_back_the_fixed_width_weights(tmp_path, fixed_lenet, codec):
    save_point_network(fixed_lenet, tmp_path / "fixed.bq")
    save_point_network(fixed_lenet, tmp_path / "coded.bq", codec=codec)
    fixed, coded = load_point_network(tmp_path / "fixed.bq"), load_point_network(tmp_path / "coded.bq")
    assert list(fixed) == list(coded) == list(fixed_lenet.sites)
    for name in fixed:
        assert torch.equal(fixed[name], coded[name])
        assert torch.equal(coded[name], fixed_lenet.median()[name].to(coded[name].dtype))


def test_ans_point_network_costs_at_most_its_entropy_plus_a_fifth_of_a_bit(tmp_path, fixed_lenet):
    weights = torch.cat([w.reshape(-1) for w in fixed_lenet.median().values()])
    entropy = weight_entropy(weights)
    k = torch.unique(weights).numel()
    save_point_network(fixed_lenet, tmp_path / "fixed.bq")
    save_point_network(fixed_lenet, tmp_path / "ans.bq", codec="ans")
    fixed_bpp = point_network_bits_per_param(tmp_path / "fixed.bq", fixed_lenet.num_params)
    ans_bpp = point_network_bits_per_param(tmp_path / "ans.bq", fixed_lenet.num_params)
    assert entropy < math.ceil(math.log2(k)) - 0.5  # a skewed codebook, where coding pays
    assert ans_bpp <= entropy + 0.2  # every header and table included
    assert ans_bpp < fixed_bpp


def test_unknown_codec_and_a_damaged_coded_stream_are_refused(tmp_path, fixed_lenet):
    with pytest.raises(ValueError, match="codec"):
        save_point_network(fixed_lenet, tmp_path / "x.bq", codec="gzip")
    path = tmp_path / "ans.bq"
    save_point_network(fixed_lenet, path, codec="ans")
    meta, tensors = read_container(path, POINT_KIND)
    tensors["idx"] = tensors["idx"][:-4]  # a truncated index stream under a valid checksum
    write_container(tmp_path / "cut.bq", POINT_KIND, meta, tensors)
    with pytest.raises(CorruptFileError):
        load_point_network(tmp_path / "cut.bq")
