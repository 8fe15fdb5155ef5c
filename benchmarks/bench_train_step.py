"""Training-step time of a decomposed ResNet-50 (EDP phase) relative to the original ResNet-50, side by side.

One training step = forward + cross-entropy backward + SGD(momentum) step, and for decomposed models also the prox
step of :class:`edp_det.EDPRegularizer` (tiny λ so the structure does not change while timing).

Variants (all timed alternately in the same run, ratios per round, median over rounds):
  * ``orig``                  torchvision ResNet-50 (the baseline of every ratio)
  * ``two_conv`` / ``effective`` / ``auto``   decomposed at full rank (start of the EDP phase), one forward mode
  * ``mid{p}/zeros``          ``p`` of every block's β columns (the weakest) set to zero but *not* removed (auto;
                              only for the largest ``p``)
  * ``mid{p}/compact``        the same after :func:`edp_det.edp.compaction.compact_zero_groups` (auto)
The ``flops`` column is the analytic multiply-add ratio of the step's convolutions and linear layers (forward plus
the backward passes autograd runs), i.e. what the cost model of ``forward_mode="auto"`` sees.

    .venv/bin/python benchmarks/bench_train_step.py --settings 8x128   # ~4 min on 2 shared cores
    .venv/bin/python benchmarks/bench_train_step.py --settings 2x224
    .venv/bin/python benchmarks/bench_train_step.py --quick         # < 1 min smoke run (2x64)
    .venv/bin/python benchmarks/bench_train_step.py --settings 4x160 --rounds 5
    .venv/bin/python benchmarks/bench_train_step.py --flops-only --settings 2x224 32x224 2x800
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import machine_info, table
from edp_det import EDPRegularizer, decompose, iter_blocks
from edp_det.deploy.timing import time_alternating
from edp_det.ops.block import CompressedAwareConv2d
from edp_det.edp.compaction import compact_zero_groups


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["8x128", "2x224"], help="BATCHxPIXELS settings")
    p.add_argument("--mid", nargs="*", type=float, default=[0.25, 0.5],
                   help="fractions of β columns zeroed for the mid-training states")
    p.add_argument("--modes", nargs="+", default=["two_conv", "effective", "auto"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: on 2 shared cores OpenMP spinning makes 2 threads erratic)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--flops-only", action="store_true",
                   help="only the analytic flops ratios (no timing): cheap, for large settings such as 2x800")
    p.add_argument("--no-zeros", action="store_true", help="skip the uncompacted mid-training variants")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (< 1 min): 2x64, 1 round, 1 iter, auto and mid 0.5 compacted only")
    return p


def zero_weakest_columns(model: nn.Module, frac: float) -> None:
    """Zero the ``frac`` weakest β columns (by L2 norm) of every block (at least one column survives)."""
    with torch.no_grad():
        for _, b in iter_blocks(model):
            beta = b.beta_2d()
            k = min(int(round(frac * b.rank)), b.rank - 1)
            if k > 0:
                beta[:, torch.argsort(beta.norm(dim=0))[:k]] = 0


def train_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one training step's conv/linear layers under the model's forward modes (analytic)."""
    total = [0]
    hooks = []
    inner = set()
    for name, m in model.named_modules():
        if isinstance(m, CompressedAwareConv2d):
            inner.update({id(m.basis), id(m.coeff)})

    def block_hook(m, inp, out):
        x_ = inp[0]
        p = out.shape[0] * out.shape[2] * out.shape[3]
        kk = m.kernel_size[0] * m.kernel_size[1]
        ci, r, co = m.in_channels, m.rank, m.out_channels
        g_t, g_b, g_x = m.basis.weight.requires_grad, m.coeff.weight.requires_grad, x_.requires_grad
        two = p * r * ci * kk * (1 + g_t + g_x) + p * r * co * (1 + g_b + (g_t or g_x))
        eff = p * co * ci * kk * (1 + (g_t or g_b) + g_x) + co * r * ci * kk * (1 + g_b + g_t)
        total[0] += eff if m._use_effective(x_) else two

    def conv_hook(m, inp, out):
        if id(m) in inner:
            return
        x_ = inp[0]
        if isinstance(m, nn.Conv2d):
            macs = out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        else:
            macs = out.numel() * m.in_features
        total[0] += macs * (1 + m.weight.requires_grad + x_.requires_grad)

    for m in model.modules():
        if isinstance(m, CompressedAwareConv2d):
            hooks.append(m.register_forward_hook(block_hook))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(conv_hook))
    try:
        model(x)  # grad enabled, as in training (the graph is discarded)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, edp: bool, lr: float = 1e-3):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    reg = EDPRegularizer(model, lambda_rank=1e-6, lambda_channel=1e-6, optimizer=opt) if edp else None

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if reg is not None:
            reg.prox_step(lr)
    return step


def build_variants(args, base: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    out = {"orig": (base, False)}
    full = copy.deepcopy(base)
    decompose(full, forward_mode="auto")
    for mode in args.modes:
        m = copy.deepcopy(full)
        for _, b in iter_blocks(m):
            b.forward_mode = mode
        out[mode] = (m, True)
    for frac in args.mid:
        z = copy.deepcopy(full)
        zero_weakest_columns(z, frac)
        if not args.no_zeros and frac == max(args.mid):   # one uncompacted reference is enough
            out[f"mid{int(frac * 100)}/zeros"] = (z, True)
        c = copy.deepcopy(z)
        compact_zero_groups(c)
        out[f"mid{int(frac * 100)}/compact"] = (c, True)
    return out


def main(args):
    if args.quick:
        args.settings, args.rounds, args.iters, args.mid, args.modes = ["2x64"], 1, 1, [0.5], ["auto"]
        args.no_zeros = True
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from torchvision.models import resnet50

    base = resnet50(num_classes=args.num_classes)
    variants = build_variants(args, base)
    print(f"# bench_train_step  {machine_info()}")
    print(f"# rounds={args.rounds} iters={args.iters}; ratio = median over rounds of (variant / orig, same round)")
    t_start = time.perf_counter()
    for setting in args.settings:
        bs, px = (int(v) for v in setting.lower().split("x"))
        x = torch.randn(bs, 3, px, px)
        y = torch.randint(0, args.num_classes, (bs,))
        macs = {n: train_macs(m, x) for n, (m, _) in variants.items()}
        if args.flops_only:
            rows = [[n, f"{macs[n] / macs['orig']:.3f}"] for n in variants]
            print(f"\n## batch {bs} x {px}px  (analytic, no timing)")
            print(table(["variant", "flops ratio"], rows))
            continue
        steps = {n: make_step(m, x, y, edp) for n, (m, edp) in variants.items()}
        timed = time_alternating(steps, rounds=args.rounds, iters=args.iters, warmup=1)
        rat, spr = timed.ratios("orig"), timed.ratio_ranges("orig")
        rows = []
        for n in variants:
            rows.append([n, f"{1e3 * timed.median(n):.0f}", f"{rat[n]:.3f}", f"{spr[n][0]:.2f}-{spr[n][1]:.2f}",
                         f"{macs[n] / macs['orig']:.3f}"])
        print(f"\n## batch {bs} x {px}px  (goal: auto / orig <= 1.10)")
        print(table(["variant", "ms/step", "time ratio", "round range", "flops ratio"], rows))
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
