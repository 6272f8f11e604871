"""What the QIU grid does to each layer's weights: the 5th-95th percentile clip, and a layer as site or module.

For the trained LeNet-5 BNN that ``benchmarks/mixed_acceptance.py`` caches
(run it first, same ``--full`` / size options), QIU allocates at the target,
then for each site prints the width and ``||Q(mu)|| / ||mu||`` (how far the
quantized means shrink, 1 = not at all) and the largest ``|Q(mu) - mu|``,
for four grids: clipped / unclipped (``clip``) times a layer per site / per
module (``layers``).

Run::

    python benchmarks/mixed_acceptance.py --train-only && python benchmarks/mixed_clip.py
    python benchmarks/mixed_clip.py --full
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from pyro_bq.mixed import quantile_inform, quantize_means


def _acceptance():
    spec = importlib.util.spec_from_file_location("mixed_acceptance", Path(__file__).with_name("mixed_acceptance.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> dict:
    acc = _acceptance()
    args = acc.build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.full:
        args.pretrain_epochs, args.svi_epochs = max(args.pretrain_epochs, 12), max(args.svi_epochs, 5)
    train, _, _ = acc.split(args)
    _, guide = acc.load_or_fit(args, train)
    means = {n: guide.get_loc_scale(n)[0].detach() for n in guide.sites}
    out = {}
    header = f"{'site':18s}"
    for clip in (True, False):
        for layers in ("site", "module"):
            alloc = quantile_inform(guide, args.target, clip=clip, layers=layers)
            q = {n: v.detach() for n, v in quantize_means(guide, alloc).items()}
            label = f"{'clip' if clip else 'minmax'}/{layers}"
            header += f" | {label + ' bits, norm ratio, max err':38s}"
            out[label] = {n: (alloc[n], float(q[n].norm() / means[n].norm()), float((q[n] - means[n]).abs().max()))
                          for n in guide.sites}
    print(header)
    for n in guide.sites:
        print(f"{n.removeprefix('net.'):18s}" + "".join(f" | {v[n][0]:2d} {v[n][1]:6.3f} {v[n][2]:9.4f}{'':17s}"
                                                      for v in out.values()))
    return out


if __name__ == "__main__":
    main()
