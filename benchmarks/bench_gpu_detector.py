"""Faster R-CNN R50-FPN at 800 px on a GPU: baseline vs EDP at a backbone FLOPs cut, side by side.

What it measures (one short run, meant for a lent GPU; the paper's Table XI reports 50.4 → 60.5 FPS):
  * inference FPS of the full detector (pre- and post-processing included) and of the backbone body, at every batch
    of ``--batches``, under mixed precision (``torch.autocast``, float16; ``--no-amp`` for float32), every variant
    timed alternately (:func:`edp_det.deploy.timing.time_alternating`, synchronised on the device);
  * the EDP phase's training-step ratio: one optimizer step (forward with losses, backward through a ``GradScaler``,
    SGD) of the decomposed detector at full rank plus the proximal step of :class:`edp_det.EDPRegularizer`,
    against the same step of the baseline, alternating.

The models: ``--baseline`` / ``--model`` files (``edp_det.save_compressed``, e.g. a trained detector and its
``tools/train_det.py`` output), or by default torchvision's R50-FPN built with random weights (nothing is
downloaded), and as "EDP" the same network decomposed and put through ``prune_and_merge(flops_target=R)`` with the
default budget. Random weights give the budget's structure, not one chosen by training: pass trained files for the
speed of a real compressed detector. FLOPs and the FLOPs-ideal speed-up come from the real models.

    python benchmarks/bench_gpu_detector.py --output-json gpu.json           # on the GPU machine, ~2 min
    python benchmarks/bench_gpu_detector.py --quick                          # CPU smoke run (R18, 128 px)
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from _common import machine_info, table
import edp_det
from edp_det.deploy.timing import time_alternating


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=800, help="square network input (min_size = max_size)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="inference batch sizes")
    p.add_argument("--flops-target", type=float, default=0.4, help="backbone FLOPs cut R of the built EDP model")
    p.add_argument("--depth", type=int, default=50, help="ResNet depth of the built models")
    p.add_argument("--baseline", help="baseline detector file instead of the built one")
    p.add_argument("--model", help="compressed detector file instead of the built one")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="timed calls per variant and round")
    p.add_argument("--train-batch", type=int, default=2, help="images per training step (0: skip the step ratio)")
    p.add_argument("--train-iters", type=int, default=5, help="timed training steps per variant and round")
    p.add_argument("--no-amp", action="store_true", help="float32 instead of autocast float16")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: ResNet-18, 128 px, batches 1 2, 1 round")
    p.add_argument("--output-json", help="also write the results here")
    return p


def build_models(args):
    torch.manual_seed(0)
    arch = dict(num_classes=91, depth=args.depth, min_size=args.size, max_size=args.size)
    base = edp_det.load_compressed(args.baseline) if args.baseline else edp_det.build_model("fasterrcnn", **arch)
    if args.model:
        comp = edp_det.load_compressed(args.model)
    else:
        comp = copy.deepcopy(base)
        edp_det.decompose(comp)
        edp_det.prune_and_merge(comp, flops_target=args.flops_target, input_size=(3, args.size, args.size))
    return base.eval(), comp.eval()


def backbone_flops(model, size: int) -> int:
    return edp_det.count_flops(model, input_size=(3, size, size)).flops_under("backbone.body")


def inference(models: dict, args, dev, amp: bool) -> list[dict]:
    rows = []
    for b in args.batches:
        g = torch.Generator().manual_seed(b)
        images = [torch.rand(3, args.size, args.size, generator=g).to(dev) for _ in range(b)]
        x = torch.stack(images)

        def call(fn, arg):
            def run():
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
                    return fn(arg)
            return run
        variants = {}
        for name, m in models.items():
            variants[("detector", name)] = call(m, images)
            variants[("backbone", name)] = call(m.backbone.body, x)
        t = time_alternating(variants, rounds=args.rounds, iters=args.iters, warmup=2, device=dev)
        row = {"batch": b}
        for part in ("detector", "backbone"):
            for name in models:
                row[f"{part}_{name}_fps"] = b / t.median((part, name))
            row[f"{part}_speedup"] = 1 / t.ratios((part, "baseline"))[(part, "edp")]   # per round, median
        rows.append(row)
    return rows


def training_step_ratio(base, args, dev, amp: bool) -> dict:
    """Seconds per training step of the decomposed detector at full rank (+ prox) and of the baseline."""
    models = {"baseline": copy.deepcopy(base).to(dev).train()}
    dec = edp_det.decompose(copy.deepcopy(base)).to(dev).train()
    models["edp_phase"] = dec
    reg = edp_det.EDPRegularizer(dec, 1e-8, 1e-8)      # tiny λ: the structure does not change while timing
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.size, args.size, generator=g).to(dev) for _ in range(args.train_batch)]
    s = args.size
    targets = [{"boxes": torch.tensor([[0.1 * s, 0.1 * s, 0.6 * s, 0.7 * s], [0.4 * s, 0.3 * s, 0.9 * s, 0.8 * s]],
                                      device=dev),
                "labels": torch.tensor([1, 2], device=dev)} for _ in images]
    steps = {}
    for name, m in models.items():
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp)

        def step(m=m, opt=opt, scaler=scaler, name=name):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
                loss = sum(m(images, targets).values())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if name == "edp_phase":
                reg.prox_step(1e-4)
        steps[name] = step
    t = time_alternating(steps, rounds=args.rounds, iters=args.train_iters, warmup=2, device=dev)
    return {"baseline_s": t.median("baseline"), "edp_phase_s": t.median("edp_phase"),
            "ratio": t.median("edp_phase") / t.median("baseline")}


def main(args):
    if args.quick:
        args.device, args.size, args.depth, args.batches = "cpu", 128, 18, [1, 2]
        args.rounds, args.iters, args.train_iters, args.train_batch = 1, 2, 1, 1
    dev = torch.device(args.device)
    amp = dev.type == "cuda" and not args.no_amp
    t0 = time.perf_counter()
    base, comp = build_models(args)
    f_base, f_comp = backbone_flops(base, args.size), backbone_flops(comp, args.size)
    d_base = edp_det.count_flops(base, input_size=(3, args.size, args.size)).flops
    d_comp = edp_det.count_flops(comp, input_size=(3, args.size, args.size)).flops
    models = {"baseline": base.to(dev), "edp": comp.to(dev)}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# bench_gpu_detector  {machine_info()} device={name} amp={amp}")
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (base, comp)]
    print(f"# R{args.depth}-FPN {args.size}px; backbone FLOPs cut {1 - f_comp / f_base:.3f} (ideal backbone "
          f"{f_base / f_comp:.2f}x, detector {d_base / d_comp:.2f}x); params {params[0]:.2f} M -> {params[1]:.2f} M; "
          f"rounds={args.rounds} iters={args.iters}")
    rows = inference(models, args, dev, amp)
    print(table(["batch", "detector FPS base", "detector FPS EDP", "speed-up", "backbone FPS base",
                 "backbone FPS EDP", "speed-up", "of ideal (backbone)"],
                [[r["batch"], f"{r['detector_baseline_fps']:.1f}", f"{r['detector_edp_fps']:.1f}",
                  f"{r['detector_speedup']:.2f}x", f"{r['backbone_baseline_fps']:.1f}",
                  f"{r['backbone_edp_fps']:.1f}", f"{r['backbone_speedup']:.2f}x",
                  f"{r['backbone_speedup'] / (f_base / f_comp):.2f}"] for r in rows]))
    out = {"device": name, "amp": amp, "size": args.size, "depth": args.depth, "flops_backbone": [f_base, f_comp],
           "flops_detector": [d_base, d_comp], "inference": rows}
    if args.train_batch > 0:
        tr = training_step_ratio(base.cpu(), args, dev, amp)
        out["training_step"] = tr
        print(f"# training step, batch {args.train_batch}: baseline {tr['baseline_s'] * 1e3:.1f} ms, EDP phase "
              f"(decomposed, full rank, + prox) {tr['edp_phase_s'] * 1e3:.1f} ms: ratio {tr['ratio']:.3f}")
    print(f"# total {time.perf_counter() - t0:.0f} s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
