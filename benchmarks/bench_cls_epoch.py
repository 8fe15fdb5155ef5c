"""Classification epoch time of EDP before ES and after PM against the baseline, side by side (paper Table X).

Paper (ResNet-50, ImageNet, 1080 Ti GPUs): baseline 0.53 h/epoch; EDP 0.63 h/epoch before Epoch_ES (+19%) and
0.43 h/epoch after PM (-19%). Goal here: EDP before ES <= +10% over the baseline.

Variants (same data, same optimizer settings, timed alternately; ratios per round, median over rounds):
  * ``baseline``     the undecomposed ResNet (``method: baseline``)
  * ``edp_before_es`` decomposed at full rank, every step followed by the proximal step (``method: edp`` during
                     ``[0, Epoch_ES)``) — built and driven through :class:`edp_det.methods.EDPMethod` exactly as the
                     engine does (prepare / attach / after_step)
  * ``edp_after_pm`` the same model after PM to ``--flops-target`` (``[Epoch_ES, E)``): ordinary convs, no prox
One "epoch" is ``--iters`` training steps (forward, cross-entropy backward, SGD with momentum and weight decay,
method hook) over batches of a synthetic ImageFolder read through :class:`edp_det.train.classification.ClassificationTask`'s
data pipeline. By default the batches are decoded once and cached, so the figure is the training compute; with
``--live-loader`` every epoch iterates the DataLoader (decode + augmentation included, as in the paper's epoch
times). Ratios scale to a full epoch: every step of an epoch costs the same.

    .venv/bin/python benchmarks/bench_cls_epoch.py --quick            # smoke run: ResNet-18, 8x64px, seconds
    .venv/bin/python benchmarks/bench_cls_epoch.py                    # ResNet-50, 32x224px (the paper's per-GPU batch)
    .venv/bin/python benchmarks/bench_cls_epoch.py --device cuda --amp --iters 50 --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import machine_info, table
from edp_det.deploy.timing import time_alternating

PAPER = {"edp_before_es": 0.63 / 0.53, "edp_after_pm": 0.43 / 0.53}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="registry name (resnet18..resnet152)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32, help="per-process batch (paper: 256 = 32 x 8 GPUs)")
    p.add_argument("--iters", type=int, default=20, help="training steps per timed 'epoch'")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=5, help="synthetic shape classes (at most 7)")
    p.add_argument("--flops-target", type=float, default=0.4, help="R_FLOPs of the PM variant")
    p.add_argument("--data-root", default=None, help="an ImageFolder root (default: a synthetic one in a temp dir)")
    p.add_argument("--live-loader", action="store_true", help="iterate the DataLoader every epoch (no cache)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--amp", action="store_true", help="autocast + GradScaler on CUDA (as train.amp)")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads (1: stable on shared cores)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: resnet18, 8x64 px, 3 steps per epoch, 2 rounds")
    return p


def _data(args, tmp: Path):
    from edp_det.train.classification import ClassificationTask
    from edp_det.data.imagefolder import make_synthetic_imagefolder
    from edp_det.methods import config_schema
    from edp_det.runtime.distributed import DistInfo

    root = args.data_root
    if root is None:
        shapes = ["circle", "square", "triangle", "diamond", "cross", "star", "hexagon"][:args.num_classes]
        n = -(-args.batch_size * args.iters // len(shapes))
        make_synthetic_imagefolder(tmp / "data", n, 1, image_size=max(args.image_size, 32), seed=0, classes=shapes)
        root = tmp / "data"
    cfg = config_schema("classification").defaults()
    cfg["data"].update(root=str(root), image_size=args.image_size, check_images=False)
    cfg["train"].update(batch_size=args.batch_size, num_workers=args.num_workers)
    cfg["model"]["name"] = args.model
    task = ClassificationTask(cfg)
    single = DistInfo(0, 1, 0, torch.device("cpu"), False)
    task.setup(single)
    return task, single


def _trainer_step(model, method, args, device, lr=1e-3):
    """One engine-style step factory: returns ``step(batch)`` for ``model`` driven by ``method``."""
    from edp_det.train.engine import build_optimizer

    tcfg = {"optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4}
    model.to(device).train()
    opt = build_optimizer(model, tcfg)
    method.attach(model, opt)
    use_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def step(batch):
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        method.after_step(model, lr, 0)
    return step


def main(args):
    if args.quick:
        args.model, args.image_size, args.batch_size, args.iters, args.rounds = "resnet18", 64, 8, 3, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    from edp_det.ops.flops import count_flops
    from edp_det.methods import build_method

    with tempfile.TemporaryDirectory() as tmp:
        task, single = _data(args, Path(tmp))
        size = task.input_size()
        base = task.original_model()
        # tiny λ: the structure must not change while timing (the prox step's cost does not depend on λ)
        ccfg = {"lambda_rank": 1e-6, "lambda_channel": 1e-6, "epoch_es": 1, "flops_target": args.flops_target}
        m_base = build_method("baseline", ccfg, 2)
        m_edp = build_method("edp", ccfg, 2)
        edp = m_edp.prepare(copy.deepcopy(base))
        m_pm = build_method("edp", ccfg, 2)
        pm = m_pm.prepare(copy.deepcopy(base))
        report = m_pm.prune(pm, size)          # method.pruned = True: after_step is a no-op, as after Epoch_ES
        models = {"baseline": (base, m_base), "edp_before_es": (edp, m_edp), "edp_after_pm": (pm, m_pm)}
        flops = {n: count_flops(m, input_size=size).flops for n, (m, _) in models.items()}
        steps = {n: _trainer_step(m, meth, args, device) for n, (m, meth) in models.items()}
        if args.live_loader:
            def batches():
                for i, b in enumerate(task.train_loader(0, single)):
                    if i >= args.iters:
                        break
                    yield b
        else:
            cached = [b for _, b in zip(range(args.iters), task.train_loader(0, single))]
            batches = lambda: iter(cached)  # noqa: E731

        def epoch(step):
            def run():
                for b in batches():
                    step(b)
            return run

        print(f"# bench_cls_epoch  {machine_info()}")
        print(f"# {args.model} batch {args.batch_size} x {args.image_size}px, {args.iters} steps/epoch, device "
              f"{device}{' amp' if args.amp else ''}, {'live loader' if args.live_loader else 'cached batches'}, "
              f"rounds={args.rounds}; PM to R_FLOPs {report['achieved_r_flops']:.3f}")
        t0 = time.perf_counter()
        timed = time_alternating({n: epoch(s) for n, s in steps.items()}, rounds=args.rounds, iters=1, warmup=1,
                                 device=device)
        rat, spr = timed.ratios("baseline"), timed.ratio_ranges("baseline")
        rows = []
        for n in models:
            rows.append([n, f"{timed.median(n):.2f}", f"{rat[n]:.3f}", f"{spr[n][0]:.2f}-{spr[n][1]:.2f}",
                         f"{flops[n] / flops['baseline']:.3f}",
                         f"{PAPER[n]:.2f}" if n in PAPER else "1.00"])
        print(table(["variant", "s/epoch", "time ratio", "round range", "flops ratio", "paper ratio"], rows))
        goal = rat["edp_before_es"] <= 1.10
        print(f"# goal EDP before ES <= 1.10 x baseline: {'met' if goal else 'NOT met'} "
              f"({rat['edp_before_es']:.3f}); total {time.perf_counter() - t0:.0f} s")
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(
                {"args": vars(args), "machine": machine_info(),
                 "seconds_per_epoch": {n: timed.round_values(n) for n in timed.names}, "ratio": rat,
                 "flops": flops, "paper_ratio": PAPER}, indent=2))
    return rat


if __name__ == "__main__":
    main(get_args_parser().parse_args())
