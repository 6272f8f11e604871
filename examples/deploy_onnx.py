"""Deploy a quantized LeNet-5 BNN with ONNX: train, quantize to JQ(4), export, run in onnxruntime alone.

Trains a mean-field LeNet-5 on MNIST (:mod:`pyro_bq.recipes`), quantizes it with
JQ(4), writes the packed guide (fixed-width and ANS-coded) and two ONNX graphs
(weight noise drawn in the graph; noise fed as the input ``eps``), then runs
both graphs in a *separate Python process that imports only numpy and
onnxruntime* (its ``sys.modules`` is checked: no pyro, no pyro_bq, no torch).
It prints accuracy and AUROC of the mutual information (MNIST in, Fashion-MNIST
out) from the onnxruntime outputs next to pyro_bq's own:

* ``pyro_bq``: :func:`pyro_bq.uncertainty.evaluate` with its own seeded draws;
* ``onnx (graph noise)``: the deployable graph, its own draws;
* ``pyro_bq (eps)`` and ``onnx (eps)``: the same ``eps`` draws through both.

Run (the acceptance figures: 2,000 test images, 32 draws)::

    python examples/deploy_onnx.py --num-steps 2000 --pretrain-epochs 1 --test-limit 2000

A tiny smoke run::

    python examples/deploy_onnx.py --num-steps 5 --pretrain-epochs 0 --train-limit 256 --test-limit 64 --num-samples 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch

from pyro_bq import IIDNormal
from pyro_bq._validation import resolve_device
from pyro_bq.data import load_fashion_mnist, load_mnist
from pyro_bq.export import to_onnx, weights_from_eps
from pyro_bq.guides import quantize
from pyro_bq.io import save_packed
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.quant import JQ
from pyro_bq.recipes import fit_meanfield_bnn, pretrain
from pyro_bq.uncertainty import accuracy, auroc, decompose, evaluate, predictive_probs

#: modules the onnxruntime process must not import
FORBIDDEN = ("pyro", "pyro_bq", "torch")

#: the standalone runner: numpy and onnxruntime only
RUNNER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import onnxruntime as ort

    def auroc(score_in, score_out):
        both = np.concatenate([score_in, score_out])
        values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts).astype(np.float64)
        ranks = (ends - (counts - 1) / 2.0)[inverse]
        n_in, n_out = len(score_in), len(score_out)
        return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))

    def run(sess, x, feeds, batch):
        probs, mi = [], []
        for i in range(0, len(x), batch):
            out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x[i:i + batch], **feeds})))
            probs.append(out["probs"])
            mi.append(out["epistemic"])
        return np.concatenate(probs), np.concatenate(mi)

    folder = sys.argv[1]
    x_in, y_in = np.load(folder + "/mnist_x.npy"), np.load(folder + "/mnist_y.npy")
    x_out = np.load(folder + "/fashion_x.npy")
    eps = np.load(folder + "/eps.npy")
    result = {}
    for name, path, feeds in (("graph", "/lenet-jq4.onnx", {}), ("eps", "/lenet-jq4-eps.onnx", {"eps": eps})):
        sess = ort.InferenceSession(folder + path, providers=["CPUExecutionProvider"])
        p_in, mi_in = run(sess, x_in, feeds, 250)
        _, mi_out = run(sess, x_out, feeds, 250)
        result[name] = {"accuracy": float((p_in.argmax(1) == y_in).mean()), "auroc_mi": auroc(mi_in, mi_out)}
    bad = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    result["forbidden_imports"] = bad
    print(json.dumps(result))
''').replace("FORBIDDEN", repr(FORBIDDEN))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="folder with MNIST/raw and FashionMNIST/raw (default: PYRO_BQ_DATA)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=2000, help="test images (MNIST and Fashion each)")
    p.add_argument("--pretrain-epochs", type=int, default=1, help="epochs of deterministic pretraining (the guide's means)")
    p.add_argument("--num-steps", type=int, default=300, help="SVI steps of the mean-field guide")
    p.add_argument("--num-samples", type=int, default=32, help="weight draws per prediction")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto",
                   help="auto, cpu or cuda: device of training (auto: cuda when available; export and evaluation "
                   "run on the CPU)")
    p.add_argument("--out-dir", default=None, help="where the files go (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    for option in ("test_limit", "num_steps", "num_samples", "batch_size"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.train_limit is not None and args.train_limit < 1:
        p.error(f"--train-limit must be >= 1, got {args.train_limit}")
    if args.pretrain_epochs < 0 or args.seed < 0:
        p.error("--pretrain-epochs and --seed must be >= 0")
    try:
        resolve_device(args.device, name="--device")
    except (TypeError, ValueError) as err:
        p.error(str(err))  # one line and exit status 2, no traceback
    return args


def train(args, train_data):
    """A mean-field LeNet-5 BNN, its means started at a pretrained network."""
    device = resolve_device(args.device, name="--device")
    if device.type != "cpu":
        train_data = type(train_data)(train_data.x.to(device), train_data.y.to(device), name=train_data.name)
    net = pretrain(lambda: LeNet5().to(device), train_data, epochs=args.pretrain_epochs, batch_size=args.batch_size,
                   seed=args.seed)
    model = BayesianClassifier(LeNet5().to(device), IIDNormal(1.0), dataset_size=len(train_data))
    guide, _ = fit_meanfield_bnn(model, train_data, pretrained=net, num_steps=args.num_steps,
                                 batch_size=args.batch_size, seed=args.seed, progress=False)
    return model.cpu(), guide.cpu()  # exported and compared on the CPU


def pyro_bq_with_eps(model, qguide, test, fashion, eps) -> dict:
    """pyro_bq's accuracy and AUROC(MI) for the weight draws of the noise ``eps``."""
    samples = weights_from_eps(qguide, eps)
    p_in = predictive_probs(model, x=test.x, samples=samples)
    p_out = predictive_probs(model, x=fashion.x, samples=samples)
    return {"accuracy": accuracy(p_in, test.y),
            "auroc_mi": auroc(decompose(p_in)["epistemic"], decompose(p_out)["epistemic"])}


def run_standalone(folder: Path) -> dict:
    """Run the ONNX graphs in a fresh Python process that may import numpy and onnxruntime only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", RUNNER, str(folder)], capture_output=True, text=True, env=env,
                          cwd=folder, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the onnxruntime process failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["forbidden_imports"]:
        raise RuntimeError(f"the onnxruntime process imported {result['forbidden_imports']}")
    return result


def main(args) -> dict:
    torch.manual_seed(args.seed)
    train_data = load_mnist(args.data_root, train=True, limit=args.train_limit)
    test = load_mnist(args.data_root, train=False, limit=args.test_limit)
    fashion = load_fashion_mnist(args.data_root, train=False, limit=args.test_limit)
    model, guide = train(args, train_data)
    qguide = quantize(guide, JQ(4))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        sizes = {"bq": save_packed(qguide, folder / "lenet-jq4.bq"),
                 "bq_ans": save_packed(qguide, folder / "lenet-jq4-ans.bq", codec="ans"),
                 "onnx": to_onnx(model, qguide, folder / "lenet-jq4.onnx", num_samples=args.num_samples,
                                 example_input=test.x[:1], noise="graph", seed=args.seed)}
        to_onnx(model, qguide, folder / "lenet-jq4-eps.onnx", num_samples=args.num_samples,
                example_input=test.x[:1], noise="input")
        total = sum(info.numel for info in qguide.sites.values())
        eps = torch.randn(args.num_samples, total, generator=torch.Generator().manual_seed(args.seed + 1))
        for name, value in (("mnist_x", test.x), ("mnist_y", test.y), ("fashion_x", fashion.x), ("eps", eps)):
            np.save(folder / f"{name}.npy", value.numpy())
        onnx_result = run_standalone(folder)
    own = evaluate(model, qguide, test, fashion, num_samples=args.num_samples, seed=args.seed)
    rows = {"pyro_bq": {"accuracy": own["accuracy"], "auroc_mi": own["auroc_mi"]},
            "onnx (graph noise)": onnx_result["graph"],
            "pyro_bq (eps)": pyro_bq_with_eps(model, qguide, test, fashion, eps),
            "onnx (eps)": onnx_result["eps"]}
    record = {"rows": rows, "sizes": sizes, "num_test": len(test), "num_samples": args.num_samples,
              "forbidden_imports": onnx_result["forbidden_imports"]}
    if not args.quiet:
        print(f"LeNet-5 JQ(4), {len(test)} MNIST vs {len(fashion)} Fashion test images, {args.num_samples} draws")
        print(f"{'':22s} {'accuracy':>9s} {'AUROC(MI)':>10s}")
        for name, row in rows.items():
            print(f"{name:22s} {row['accuracy']:9.4f} {row['auroc_mi']:10.4f}")
        for a, b in (("pyro_bq", "onnx (graph noise)"), ("pyro_bq (eps)", "onnx (eps)")):
            da = abs(rows[a]["accuracy"] - rows[b]["accuracy"])
            dr = abs(rows[a]["auroc_mi"] - rows[b]["auroc_mi"])
            print(f"|{a} - {b}|: accuracy {da:.4f}, AUROC {dr:.4f} ({'PASS' if max(da, dr) <= 0.005 else 'FAIL'} "
                  "at 0.005)")
        print(f"files: .bq {sizes['bq']} B, .bq (ANS) {sizes['bq_ans']} B, .onnx {sizes['onnx']} B; the onnxruntime "
              f"process imported none of {', '.join(FORBIDDEN)}")
    return record


if __name__ == "__main__":
    main(parse_args())
