"""Inference speedup of PM-compressed ResNet-50 vs the FLOPs-ideal speedup, side by side with the original.

Model: torchvision ResNet-50 (random init, eval mode), decomposed, then a few prox steps shrink β slightly (λ set
relative to the median β column norm) so that the budget has something to choose; then
``prune_and_merge(m, flops_target=R, input_size=(3, 224, 224), ...)`` for each target R and budget variant.

Budget variants (``--budgets``): ``all`` = the default budget (rank groups of every layer, norm order divided by
the layers' estimated time per FLOP); ``tied`` = ``rank_layers="tied"`` (rank cut only where outputs feed a residual
add, channel-prunable layers stay dense); ``-uni`` = ``layer_weights=None`` (no layer weights: the paper's per-layer
ratio); ``-r8`` = ``round_to=8``; ``-lat`` = latency-aware: ``layer_weights=measure_time_per_flop(m, x)`` (marginal
model, per residual block) measured at the setting's own input ``x`` (so those models are pruned per setting);
``-latavg`` the same with ``mode="average"`` (each layer's dense conv alone).

Variants per setting (all timed alternately in one run, one untimed warm-up call per variant per round; ratios
per round, median over rounds):
  * ``orig``               the original ResNet-50, eager, as torchvision builds it (baseline)
  * ``orig+opt``           the original through :func:`edp_det.deploy.inference.optimize_for_inference` (same tricks)
  * ``pm R <budget>``      plain PM output (only for the budgets in ``--plain``)
  * ``pm R <budget> +opt`` PM output through ``optimize_for_inference`` (BN folded, measured merges and format)
  * ``floor +opt``         the model pruned to ``--floor-target`` (0.97): what no FLOPs cut of EDP removes; from it the
                           script prints, per R, whether the goal is out of reach (see :func:`bound_lines`)
Columns: ``speedup`` = t(orig) / t(variant); ``ideal`` = FLOPs(orig) / FLOPs(PM output) at that input size (conv
+ linear FLOPs, the paper's convention; the optimised form is held to the same ideal although its measured merges
add FLOPs); ``of ideal`` = speedup / ideal (goal ≥ 0.95); ``vs orig+opt`` =
t(orig+opt) / t(variant), i.e. the speedup when the original gets the same inference treatment.

    .venv/bin/python benchmarks/bench_inference.py                 # 1x224 and 32x128, ~4 min on 2 idle cores
    .venv/bin/python benchmarks/bench_inference.py --quick         # < 1 min smoke run
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from _common import machine_info, table
from edp_det import EDPRegularizer, count_flops, decompose, iter_blocks, prune_and_merge
from edp_det.deploy.inference import optimize_for_inference
from edp_det.deploy.latency import measure_time_per_flop
from edp_det.deploy.timing import time_alternating


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", type=float, default=[0.4, 0.6, 0.8], help="FLOPs cuts R")
    p.add_argument("--settings", nargs="+", default=["1x224", "32x128"], help="BATCHxPIXELS settings")
    p.add_argument("--budgets", nargs="+", default=["all", "tied-r8", "tied-r8-lat"],
                   help="PM budget variants: 'all' | 'tied' (rank_layers), optional '-rN' (round_to=N), optional "
                        "'-lat' / '-latavg' (layer_weights measured by measure_time_per_flop at each setting's input, "
                        "marginal / average model), optional "
                        "'-capNN' (max_layer_cut=NN/100)")
    p.add_argument("--plain", nargs="*", default=["all"],
                   help="budget variants also timed as plain PM output (the others only after optimize_for_inference)")
    p.add_argument("--floor-target", type=float, default=0.97,
                   help="also time the model pruned to this FLOPs cut (+opt): the structure no cut removes (0: skip)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--opt-rounds", type=int, default=3, help="timing rounds per optimize_for_inference decision")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: on 2 shared cores OpenMP spinning makes 2 threads erratic)")
    p.add_argument("--prox-steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: R=0.6 only, 1x128, 1 round")
    return p


def shrink_slightly(model, steps: int) -> None:
    """A few prox steps with λ·lr = 2 % of the median β column norm: weak directions shrink (a few to zero)."""
    with torch.no_grad():
        norms = torch.cat([b.beta_2d().norm(dim=0) for _, b in iter_blocks(model)])
    lam = 0.02 * float(norms.median())
    reg = EDPRegularizer(model, lambda_rank=lam, lambda_channel=lam)
    for _ in range(steps):
        reg.prox_step(1.0)


FLOOR = "floor"


def bound_lines(timed, flops, targets) -> str:
    """What the floor model (pruned to ``--floor-target``, +opt) says about the goal "of ideal ≥ 0.95".

    The floor keeps what no FLOPs cut of EDP removes: the residual-width tensors (conv3/downsample outputs, adds,
    ReLUs), the stem's pooling, one call per layer. Two readings, per target R:
      * necessary condition: the goal needs ``T(R) ≤ T_orig · (1 - R) / 0.95``; a model that keeps more of every
        layer than the floor is not expected to run faster than it, so ``T_floor`` above that makes it out of reach;
      * linear-model estimate: if everything above the floor shrank in proportion to FLOPs,
        ``T(R) = T_floor + (T_orig - T_floor) · ((1 - R) - f_floor) / (1 - f_floor)`` (``f`` = FLOPs fraction kept)
        and ``of ideal = T_orig / T(R) · (1 - R)``. Only an estimate: pruned layers can run more or less
        efficiently per FLOP than the original ones.
    """
    t0, tf = 1e3 * timed.median("orig+opt"), 1e3 * timed.median(FLOOR + " +opt")
    ff = flops[FLOOR] / flops["orig+opt"]
    lines = [f"# floor: {FLOOR} +opt {tf:.1f} ms = {tf / t0:.3f} of orig+opt at {ff:.3f} of its FLOPs"]
    for r in targets:
        need = (1 - r) / 0.95
        tb = tf + (t0 - tf) * ((1 - r) - ff) / (1 - ff)
        lines.append(f"# R={r:.2f}: goal needs <= {need:.3f} of orig+opt time: "
                     f"{'out of reach (floor above it)' if tf / t0 > need else 'not excluded by the floor'}; "
                     f"linear-model estimate of ideal {t0 / tb * (1 - r):.2f}")
    return "\n".join(lines)


def parse_budget(spec: str) -> dict:
    """'tied-r8-lat-cap75' -> {"rank_layers": "tied", "round_to": 8, "latency": "marginal", "max_layer_cut": 0.75,
    "uniform": False}."""
    parts = spec.split("-")
    if parts[0] not in ("all", "tied"):
        raise SystemExit(f"--budgets: {spec!r} must start with 'all' or 'tied'")
    out = {"rank_layers": parts[0], "round_to": None, "latency": None, "max_layer_cut": None, "uniform": False}
    for p in parts[1:]:
        if p == "uni":
            out["uniform"] = True
        elif p in ("lat", "latavg"):
            out["latency"] = "marginal" if p == "lat" else "average"
        elif p.startswith("cap") and p[3:].isdigit() and 0 < int(p[3:]) <= 100:
            out["max_layer_cut"] = int(p[3:]) / 100
        elif p.startswith("r") and p[1:].isdigit() and int(p[1:]) > 0:
            out["round_to"] = int(p[1:])
        else:
            raise SystemExit(f"--budgets: unknown part {p!r} in {spec!r} (expected uni, rN, lat, latavg or capNN)")
    if out["uniform"] and out["latency"]:
        raise SystemExit(f"--budgets: {spec!r}: 'uni' (no layer weights) and measured weights exclude each other")
    return out


def pm_model(dec, r: float, budget: dict, x=None):
    """PM of a copy of ``dec`` to R_FLOPs ``r`` with ``budget``; latency weights are measured at input ``x``."""
    m = copy.deepcopy(dec)
    weights = measure_time_per_flop(m, x, mode=budget["latency"]) if budget["latency"] else \
        None if budget["uniform"] else "estimate"
    rep = prune_and_merge(m, flops_target=r, input_size=(3, 224, 224), round_to=budget["round_to"],
                          rank_layers=budget["rank_layers"], layer_weights=weights,
                          max_layer_cut=budget["max_layer_cut"])
    return m.eval(), rep


def pm_line(name: str, rep) -> str:
    return (f"#   {name}: achieved R_FLOPs {rep.achieved_r_flops:.3f} (zero groups alone "
            f"{rep.r_flops_from_zero_groups:.3f}), merged {sum(l.merged for l in rep.layers)}/{len(rep.layers)} "
            f"layers, params {rep.params_after / 1e6:.2f} M, budget {rep.budget}")


def main(args):
    if args.quick:
        args.targets, args.settings, args.rounds, args.iters = [0.6], ["1x128"], 1, 2
        args.opt_rounds, args.budgets = 1, ["all", "tied-r8-lat"]
    budgets = {spec: parse_budget(spec) for spec in args.budgets}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from torchvision.models import resnet50

    t_start = time.perf_counter()
    orig = resnet50(num_classes=1000).eval()
    dec = decompose(copy.deepcopy(orig))
    shrink_slightly(dec, args.prox_steps)
    dec.eval()
    # budgets without latency weights do not depend on the timed input: prune once
    fixed, pm_lines = {}, []
    for r in args.targets:
        for spec, b in budgets.items():
            if not b["latency"]:
                name = f"pm {int(round(r * 100))}% {spec}"
                try:
                    fixed[name], rep = pm_model(dec, r, b)
                except ValueError as e:      # e.g. a max_layer_cut too tight for the target
                    pm_lines.append(f"#   {name}: skipped ({e})")
                    continue
                pm_lines.append(pm_line(name, rep))
    if args.floor_target:
        fixed[FLOOR], rep = pm_model(dec, args.floor_target, parse_budget("all-uni"))
        pm_lines.append(pm_line(FLOOR, rep))
    print(f"# bench_inference  {machine_info()}")
    print(f"# ResNet-50 random init; PM at input 224; rounds={args.rounds} iters={args.iters}")
    print("\n".join(pm_lines))
    for setting in args.settings:
        bs, px = (int(v) for v in setting.lower().split("x"))
        x = torch.randn(bs, 3, px, px)
        pms, notes = dict(fixed), []
        for r in args.targets:
            for spec, b in budgets.items():
                if b["latency"]:
                    name = f"pm {int(round(r * 100))}% {spec}"
                    try:
                        pms[name], rep = pm_model(dec, r, b, x)
                    except ValueError as e:
                        notes.append(f"#   {name}: skipped ({e})")
                        continue
                    notes.append(pm_line(name, rep))
        flops = {"orig": count_flops(orig, input_size=(3, px, px)).flops}
        models = {"orig": orig}
        t0 = time.perf_counter()
        models["orig+opt"], rep = optimize_for_inference(orig, x, rounds=args.opt_rounds, iters=1,
                                                         return_report=True)
        notes.append(f"#   orig+opt: {rep.format().splitlines()[0]}")
        flops["orig+opt"] = flops["orig"]
        for name, m in pms.items():
            flops[name] = count_flops(m, input_size=(3, px, px)).flops
            if name != FLOOR and name.split(" ", 2)[2] in args.plain:
                models[name] = m
            fast, rep = optimize_for_inference(m, x, rounds=args.opt_rounds, iters=1, return_report=True)
            models[name + " +opt"] = fast
            flops[name + " +opt"] = flops[name]   # the ideal is the compression's: measured merges add FLOPs
            notes.append(f"#   {name} +opt: {rep.format().splitlines()[0]}")
        t_opt = time.perf_counter() - t0
        with torch.no_grad():
            timed = time_alternating({n: (lambda m=m: m(x)) for n, m in models.items()}, rounds=args.rounds,
                                     iters=args.iters, warmup=1, round_warmup=1)
        sp = {n: 1 / v for n, v in timed.ratios("orig").items()}
        vs_opt = {n: 1 / v for n, v in timed.ratios("orig+opt").items()}
        rows = []
        for n in models:
            ideal = flops["orig"] / flops[n]
            rows.append([n, f"{1e3 * timed.median(n):.1f}", f"{sp[n]:.2f}x", f"{ideal:.2f}x",
                         f"{sp[n] / ideal:.2f}", f"{vs_opt[n]:.2f}x", f"{vs_opt[n] / ideal:.2f}"])
        print(f"\n## batch {bs} x {px}px  (goal: of ideal >= 0.95); optimize_for_inference took {t_opt:.0f} s")
        print("\n".join(notes))
        print(table(["variant", "ms", "speedup", "ideal", "of ideal", "vs orig+opt", "of ideal (vs orig+opt)"],
                    rows))
        if FLOOR in pms:
            print(bound_lines(timed, flops, args.targets))
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
