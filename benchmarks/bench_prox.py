"""Cost of the EDP prox step (group soft-thresholding of every β, eq. 11–13) as a share of one training iteration
(forward + backward + SGD step) of a decomposed ResNet-50, measured side by side (alternating) in one run.

    .venv/bin/python benchmarks/bench_prox.py                # 8x128 and 2x224
    .venv/bin/python benchmarks/bench_prox.py --quick        # < 1 min smoke run (2x64)

Goal: prox / training iteration <= 2 %. ``reference`` is a straightforward per-block prox with the same result,
timed in the same rounds for comparison.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _common import machine_info, table
from edp_det import EDPRegularizer, decompose
from edp_det.deploy.timing import time_alternating
from edp_det.edp.regularizer import shrink_factors, zero_momentum


@torch.no_grad()
def reference_prox(reg: EDPRegularizer, lr: float) -> None:
    """A straightforward per-block prox with the same result as ``EDPRegularizer.prox_step``, timed as the
    reference column."""
    state = reg.optimizer.state if reg.optimizer is not None else None
    for e in reg.entries:
        beta = e.block.beta_2d()
        if e.lam_col > 0:
            scale = shrink_factors(beta.norm(dim=0), lr * e.lam_col)
            beta.mul_(scale)
            if state is not None:
                zero_momentum(state, e.block.coeff.weight, (scale == 0).view(1, -1, 1, 1))
        if e.lam_row > 0:
            sq = beta.pow(2).sum(dim=1)
            for p in e.row_params:
                sq += p.pow(2)
            scale = shrink_factors(sq.sqrt(), lr * e.lam_row)
            beta.mul_(scale.unsqueeze(1))
            for p in e.row_params:
                p.mul_(scale)
            if state is not None:
                dead = scale == 0
                zero_momentum(state, e.block.coeff.weight, dead.view(-1, 1, 1, 1))
                for p in e.row_params:
                    zero_momentum(state, p, dead)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["8x128", "2x224"], help="BATCHxPIXELS settings")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2, help="timed training steps per round")
    p.add_argument("--prox-iters", type=int, default=10, help="timed prox steps per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", default="auto", help="forward mode of the decomposed model")
    p.add_argument("--quick", action="store_true", help="smoke run: 2x64, 2 rounds")
    return p


def main(args):
    if args.quick:
        args.settings, args.rounds, args.iters, args.prox_iters = ["2x64"], 2, 1, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from torchvision.models import resnet50

    model = decompose(resnet50(num_classes=1000), forward_mode=args.mode)
    model.train()
    lr = 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    # λ large enough that a few groups are actually zeroed, so the momentum-zeroing path runs too
    reg = EDPRegularizer(model, lambda_rank=1e-2, lambda_channel=1e-2, optimizer=opt)
    print(f"# bench_prox  {machine_info()}")
    print(f"# {len(reg.entries)} regularised blocks; share = median over rounds of (prox / training step, same round)")
    rows = []
    for setting in args.settings:
        bs, px = (int(v) for v in setting.lower().split("x"))
        x = torch.randn(bs, 3, px, px)
        y = torch.randint(0, 1000, (bs,))

        def train_step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def prox():
            for _ in range(args.prox_iters):   # many per call: one prox is far below timer noise of a step
                reg.prox_step(lr)

        def prox_ref():
            for _ in range(args.prox_iters):
                reference_prox(reg, lr)

        timed = time_alternating({"step": train_step, "prox": prox, "ref": prox_ref}, rounds=args.rounds,
                                 iters=args.iters, warmup=1)
        share = [r / args.prox_iters for r in timed.round_ratios("prox", "step")]
        share_ref = [r / args.prox_iters for r in timed.round_ratios("ref", "step")]
        speedup = timed.round_ratios("ref", "prox")
        rows.append([f"{bs} x {px}px", f"{1e3 * timed.median('step'):.0f}",
                     f"{1e3 * timed.median('prox') / args.prox_iters:.1f}",
                     f"{100 * statistics.median(share):.2f} %", f"{100 * min(share):.2f}-{100 * max(share):.2f} %",
                     f"{100 * statistics.median(share_ref):.2f} %", f"{statistics.median(speedup):.2f}x"])
    print(table(["setting", "train step ms", "prox ms", "prox share", "round range", "reference prox share",
                 "prox speedup vs reference"], rows))
    print("goal: prox share <= 2 %")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main(get_args_parser().parse_args())
    print(f"# total {time.perf_counter() - t0:.0f} s")
