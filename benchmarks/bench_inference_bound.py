"""How much inference speed-up any EDP structure of ResNet-50 can buy at a FLOPs cut, on this machine: an oracle.

``bench_inference.py`` measures what our budgets achieve. This script asks what the *best* structure would achieve,
so that a missed goal can be told apart from an unreachable one. EDP changes a Bottleneck in two ways: conv1/conv2
lose output channels (channel groups, λ2) and conv3/downsample lose rank (they become a 1×1 θ' + 1×1 β pair, or
stay one conv where eq. (14) says that is cheaper); the residual width, the stem and the head are never changed.
For every Bottleneck of torchvision's ResNet-50 the script builds that block in its *inference form* (norms folded
into conv biases, ``channels_last``, in-place ReLU and add, as :func:`edp_det.deploy.inference.optimize_for_inference`
leaves it) at every point of a grid

    channel keep fraction c (conv1/conv2 widths = round(c · width))  ×  rank keep fraction q
    (conv3 rank = round(q · min(width, c_out)), capped by its input width; downsample rank = round(q · min(c_in, c_out)))

and times all variants of a block alternately on the input that block really sees (median of ``rounds``). The stem
(conv + ReLU + max-pool) and head (pool + fc) are timed once, dense. Assuming block times add up (the script checks
this: the dense sum is printed next to the whole ``orig+opt`` model's time), a knapsack over blocks gives, for each
FLOPs cut R, the per-block choice with the highest ``of ideal`` = (T_dense / T) · (F_kept / F_dense) among choices
whose achieved cut is in [R, R + 1 point] — the score ``bench_inference.py`` reports (goal ≥ 0.95).

The oracle ignores accuracy (it may empty whole stages) and only searches block-uniform fractions, so it is an
estimate of the best case, not a bound in the mathematical sense; where even it stays below 0.95 no budget that
chooses among EDP's groups is expected to meet the goal on this machine.

    .venv/bin/python benchmarks/bench_inference_bound.py --threads 2              # 1x224 and 32x128, ~2.5 min
    .venv/bin/python benchmarks/bench_inference_bound.py --quick                  # < 30 s smoke run
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from _common import machine_info, table
from edp_det import count_flops
from edp_det.deploy.inference import optimize_for_inference
from edp_det.deploy.timing import time_alternating

CL = torch.channels_last


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", type=float, default=[0.4, 0.6, 0.8], help="FLOPs cuts R")
    p.add_argument("--settings", nargs="+", default=["1x224", "32x128"], help="BATCHxPIXELS settings")
    p.add_argument("--channel-keep", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.08, 0.03])
    p.add_argument("--rank-keep", nargs="+", type=float, default=[1.0, 0.6, 0.35, 0.2, 0.1, 0.05, 0.02])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 1x128, a 3 x 3 grid, 1 round")
    return p


def _conv(ci: int, co: int, k: int = 1, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(ci, co, k, stride=stride, padding=k // 2, bias=True).to(memory_format=CL)


def _maybe_pair(ci: int, co: int, rank: int, stride: int) -> nn.Module:
    """A 1×1 conv of rank ``rank``: the θ'/β pair, or one conv where eq. (14) says it costs no more."""
    if rank * (ci + co) >= ci * co:
        return _conv(ci, co, 1, stride)
    return nn.Sequential(_conv(ci, rank, 1, stride), _conv(rank, co))


class BlockVariant(nn.Module):
    """Inference form of a ResNet Bottleneck after EDP: conv1/conv2 ``k`` wide, conv3 / downsample at a rank."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int, downsample: bool, keep: tuple[float, float]):
        super().__init__()
        ch, rk = keep
        k = max(1, round(width * ch))
        self.conv1, self.conv2 = _conv(c_in, k), _conv(k, k, 3, stride)
        self.conv3 = _maybe_pair(k, c_out, min(k, max(1, round(min(width, c_out) * rk))), 1)
        self.downsample = (_maybe_pair(c_in, c_out, max(1, round(min(c_in, c_out) * rk)), stride)
                           if downsample else None)

    def forward(self, x):
        out = self.conv3(self.conv2(self.conv1(x).relu_()).relu_())
        out += self.downsample(x) if self.downsample is not None else x
        return out.relu_()


def block_specs(model) -> list[tuple[str, int, int, int, int, bool]]:
    """(name, c_in, width, c_out, stride, has downsample) of every Bottleneck, read from the model."""
    out = []
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, b in enumerate(getattr(model, stage)):
            out.append((f"{stage}.{i}", b.conv1.in_channels, b.conv1.out_channels, b.conv3.out_channels,
                        b.conv2.stride[0], b.downsample is not None))
    return out


def knapsack(options: dict[str, dict], budget_lo: float, budget_hi: float, fixed_t: float, fixed_f: float,
             t0: float, f0: float, unit: float):
    """Best per-block choice: maximise (t0 / T) · (F / f0) with F (kept FLOPs) in [budget_lo, budget_hi].

    ``options``: block -> {keep: (seconds, flops)}. FLOPs are rounded up to ``unit`` for the table (the
    reported FLOPs are exact sums)."""
    best = {0: (0.0, 0, [])}        # used units -> (time, exact flops, choices)
    cap = int((budget_hi - fixed_f) / unit)
    for name, opts in options.items():
        nxt: dict[int, tuple] = {}
        for used, (t, f, ch) in best.items():
            for keep, (tb, fb) in opts.items():
                u = used + math.ceil(fb / unit)
                if u > cap:
                    continue
                if u not in nxt or nxt[u][0] > t + tb:
                    nxt[u] = (t + tb, f + fb, ch + [keep])
        best = nxt
    cands = [(t + fixed_t, f + fixed_f, ch) for t, f, ch in best.values() if f + fixed_f >= budget_lo]
    if not cands:
        return None
    return max(cands, key=lambda c: (t0 / c[0]) * (c[1] / f0))


@torch.no_grad()
def run_setting(orig, specs, bs: int, px: int, args) -> None:
    from torchvision.models import resnet50

    x = torch.randn(bs, 3, px, px).contiguous(memory_format=CL)
    grid = [(c, q) for c in args.channel_keep for q in args.rank_keep]
    dense = (1.0, 1.0)
    t_start = time.perf_counter()
    stem = nn.Sequential(_conv(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)).eval()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(specs[-1][3], 1000)).eval()
    h = stem(x)
    options, rows = {}, []
    for name, c_in, width, c_out, stride, ds in specs:
        variants = {k: BlockVariant(c_in, width, c_out, stride, ds, k).eval().requires_grad_(False) for k in grid}
        if dense not in variants:
            variants[dense] = BlockVariant(c_in, width, c_out, stride, ds, dense).eval().requires_grad_(False)
        timed = time_alternating({k: (lambda m=m: m(h)) for k, m in variants.items()}, rounds=args.rounds,
                                 iters=args.iters, per_call=False)
        options[name] = {k: (timed.median(k), count_flops(m, example_inputs=h).flops) for k, m in variants.items()}
        t_min = min(t for t, _ in options[name].values())
        rows.append([name, f"{1e3 * options[name][dense][0]:.2f}", f"{1e3 * t_min:.2f}",
                     f"{t_min / options[name][dense][0]:.2f}"])
        h = variants[dense](h)
    timed = time_alternating({"stem": lambda: stem(x), "head": lambda: head(h)}, rounds=args.rounds,
                             iters=args.iters, per_call=False)
    t_stem, t_head = timed.median("stem"), timed.median("head")
    f_total = bs * count_flops(orig, input_size=(3, px, px)).flops     # the blocks' FLOPs are per batch
    f_blocks = sum(o[dense][1] for o in options.values())
    fixed_f = f_total - f_blocks                         # stem conv + fc: never cut
    t0 = t_stem + t_head + sum(o[dense][0] for o in options.values())
    # the additivity check: the whole original in its inference form, timed alongside its sum of parts
    whole = optimize_for_inference(resnet50(num_classes=1000).eval(), x, channels_last=True, rounds=2, iters=1)
    t_whole = time_alternating({"whole": lambda: whole(x)}, rounds=args.rounds, iters=args.iters,
                               per_call=False).median("whole")
    print(f"\n## batch {bs} x {px}px: per-block times (inference form), dense vs fastest grid point")
    print(table(["block", "dense ms", "fastest ms", "fastest/dense"], rows))
    print(f"# stem {1e3 * t_stem:.2f} ms, head {1e3 * t_head:.2f} ms; sum of parts {1e3 * t0:.1f} ms vs whole "
          f"orig+opt model {1e3 * t_whole:.1f} ms ({t0 / t_whole:.2f}); grid {len(args.channel_keep)} x "
          f"{len(args.rank_keep)}; {time.perf_counter() - t_start:.0f} s")
    res_rows = []
    for r in args.targets:
        best = knapsack(options, (1 - r - 0.01) * f_total, (1 - r) * f_total, t_stem + t_head, fixed_f, t0,
                        f_total, f_total / 4000)
        if best is None:
            res_rows.append([f"{r:.2f}", "-", "-", "-", "unreachable by the grid", ""])
            continue
        t, f, choice = best
        score = (t0 / t) * (f / f_total)
        res_rows.append([f"{r:.2f}", f"{1 - f / f_total:.3f}", f"{t / t0:.3f}", f"{score:.2f}",
                         "reachable" if score >= 0.95 else "out of reach",
                         " ".join(f"{c:g}/{q:g}" for c, q in choice)])
    print(table(["R", "achieved R", "time / dense", "of ideal", "goal >= 0.95",
                 "best (channel/rank keep) per block"], res_rows))


def main(args):
    if args.quick:
        args.settings, args.channel_keep, args.rank_keep, args.rounds = ["1x128"], [1.0, 0.5, 0.1], [1.0, 0.3, 0.05], 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from torchvision.models import resnet50

    orig = resnet50(num_classes=1000).eval()
    specs = block_specs(orig)
    print(f"# bench_inference_bound  {machine_info()}")
    print(f"# ResNet-50 Bottlenecks in inference form; rounds={args.rounds} iters={args.iters}; "
          f"channel keep {args.channel_keep}; rank keep {args.rank_keep}")
    t_start = time.perf_counter()
    for setting in args.settings:
        bs, px = (int(v) for v in setting.lower().split("x"))
        run_setting(orig, specs, bs, px, args)
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
