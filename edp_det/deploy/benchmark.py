"""Inference benchmarks of (compressed) torchvision detectors: latency/FPS, params, FLOPs and peak memory.

* :func:`measure_latency` times any callable (CUDA-synchronised when the device is CUDA).
* :func:`benchmark_detector` measures one detector: the full detector with pre/post-processing
  (``model([img])`` in eval mode) and the backbone body alone (``body_of(model)(x)``), beside params, FLOPs
  (:func:`edp_det.count_flops`) and peak inference memory.
* :func:`compare_side_by_side` measures several models *alternately* (round-robin, the order rotated every round)
  so that machine noise (other processes, frequency scaling, thermal drift) hits every model equally, and puts the
  measured speedup of each model over the first ("baseline") next to the FLOPs-ideal speedup
  ``flops_baseline / flops_model``.
* :func:`format_comparison` renders a comparison as a text table.

All timing follows the protocol of :mod:`edp_det.deploy.timing` (warm-up, alternating rounds, synchronisation).

Input size: ``input_size = (C, H, W)`` is the size of the image *as the network sees it*. The detector's
``GeneralizedRCNNTransform`` resizes (``min_size``/``max_size``) and pads (to a multiple of 32); benchmark with an
image that is already at that size (e.g. ``(3, min_size, min_size)``), otherwise the timed network runs at another
size than the one the FLOPs are counted at. The size the transform actually produces is reported as
``network_size`` and a warning is logged when it differs from ``input_size``.

Peak memory (``peak_memory_mb``, MiB) is the extra memory one inference needs on top of the loaded model, so that
it is attributable to one model even when several models share a process or a GPU:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the memory allocated at the
  reset (``peak_memory_total_mb`` is the raw ``max_memory_allocated``, which includes every model on the device);
* CPU: measured in a fresh subprocess (:func:`peak_memory_cpu`) that loads a saved model file, runs one warm-up
  inference (lazy library initialisation is not the model's), resets the process's peak RSS (Linux
  ``/proc/self/clear_refs``), runs one inference and reports the peak RSS (``VmHWM``) minus the RSS before it
  (``ru_maxrss`` is used where ``/proc`` is unavailable; it then also covers loading and the warm-up). glibc is told to return large blocks to the OS at once
  (``MALLOC_MMAP_THRESHOLD_``) so that the warm-up's freed activations do not hide in the baseline.

``model_memory_mb`` is the size of the model's parameters and buffers.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edp_det.deploy.timing import synchronize, time_alternating
from edp_det.ops.adapter import BODY, body_of, is_detector

logger = logging.getLogger(__name__)

__all__ = ["measure_latency", "benchmark_detector", "compare_side_by_side", "format_comparison", "peak_memory_cpu",
           "peak_memory_cuda", "default_input_size"]

_MIB = float(1 << 20)


# ------------------------------------------------------------------------------------------------ helpers
def _device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a torch device: {device!r} ({e})") from None


def _check_input_size(input_size) -> tuple[int, int, int]:
    try:
        t = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size must be (C, H, W) positive ints, got {input_size!r}") from None
    if len(t) != 3 or any(v <= 0 for v in t) or any(float(a) != float(b) for a, b in zip(t, input_size)):
        raise ValueError(f"input_size must be (C, H, W) positive ints, got {input_size!r}")
    return t


def _check_detector(model: nn.Module, what: str = "model") -> None:
    if not is_detector(model) or not hasattr(model.backbone, "body"):
        raise ValueError(f"{what}: expected a torchvision Faster R-CNN ({BODY}, rpn, roi_heads, transform), "
                         f"got a {type(model).__name__}")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _make_inputs(model: nn.Module, input_size, device: torch.device, seed: int = 0):
    """(image [C,H,W] for ``model([img])``, batch [1,C,H,W] for the backbone), in the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(input_size, generator=g).to(device=device, dtype=_model_dtype(model))
    return img, img.unsqueeze(0)


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(3, s, s)`` with ``s`` = the detector transform's ``min_size``: a square image of that size passes
    ``GeneralizedRCNNTransform`` unresized (when ``min_size <= max_size``)."""
    _check_detector(model)
    t = model.transform
    s = int(t.min_size[-1]) if isinstance(t.min_size, (tuple, list)) else int(t.min_size)
    s = min(s, int(t.max_size))
    return (3, s, s)


@torch.no_grad()
def _network_size(model: nn.Module, img: torch.Tensor) -> tuple[int, int]:
    images, _ = model.transform([img])
    return tuple(int(v) for v in images.tensors.shape[-2:])


def _flops(model: nn.Module, input_size) -> tuple[int, int, int]:
    """(params, flops of the ResNet body, flops of the whole detector) at ``input_size``."""
    from edp_det.ops.flops import count_flops

    rep = count_flops(model, input_size=tuple(input_size))
    parts = rep.parts
    if BODY not in parts:
        raise ValueError(f"count_flops reported no {BODY!r} part; is this a torchvision detector?")
    return rep.params, int(parts[BODY]["flops"]), int(sum(d["flops"] for d in parts.values()))


def _stats(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    median = statistics.median(s)
    p90 = s[min(len(s) - 1, max(0, math.ceil(0.9 * len(s)) - 1))]
    return {"median_ms": median, "mean_ms": statistics.fmean(s), "p90_ms": p90,
            "fps": 1000.0 / median if median > 0 else math.inf, "iters": len(s)}


# ------------------------------------------------------------------------------------------------ latency
def measure_latency(fn: Callable[[], object], *, warmup: int = 5, iters: int = 20, device="cpu") -> dict:
    """Time ``fn()``: ``warmup`` untimed calls, then ``iters`` calls timed one by one (one round of
    :func:`edp_det.deploy.timing.time_alternating`; on CUDA the device is synchronised before every clock read).

    Returns ``{"median_ms", "mean_ms", "p90_ms", "fps" (= 1000 / median_ms), "iters", "samples_ms"}``.
    """
    timed = time_alternating({"fn": fn}, rounds=1, iters=iters, warmup=warmup, device=_device(device))
    samples = [s * 1000.0 for s in timed.pooled("fn")]
    out = _stats(samples)
    out["samples_ms"] = samples
    return out


# ------------------------------------------------------------------------------------------------ memory
def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024   # bytes on macOS, KiB on Linux


def _hwm_bytes() -> int | None:
    """Peak RSS of this process image (Linux ``VmHWM``). Unlike ``ru_maxrss`` it is not inherited from the parent
    across fork + exec (``ru_maxrss`` of a fresh subprocess starts at the parent's RSS) and ``clear_refs`` resets
    it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")     # Linux >= 4.0: reset the peak RSS (VmHWM / ru_maxrss) of this process
        return True
    except OSError:
        return False


def _peak_memory_child(model_path: str, input_size: list, out_path: str, threads: int, warmup: int) -> None:
    """Body of the :func:`peak_memory_cpu` subprocess; writes its result as JSON to ``out_path``."""
    import gc

    from edp_det.deploy.serialization import load_compressed

    if threads > 0:
        torch.set_num_threads(threads)
    rss_start = _current_rss_bytes()
    model = load_compressed(model_path).eval()
    _check_detector(model, model_path)
    img, _ = _make_inputs(model, tuple(input_size), torch.device("cpu"))
    gc.collect()
    rss_loaded = _current_rss_bytes()
    with torch.no_grad():
        for _ in range(warmup):
            model([img])
    gc.collect()
    base = _current_rss_bytes()
    reset = base is not None and _hwm_bytes() is not None and _reset_peak_rss()
    if not reset:   # no /proc: peak since start (includes loading and the warm-up)
        base = _current_rss_bytes() or _maxrss_bytes()
    with torch.no_grad():
        model([img])
    peak = _hwm_bytes() if reset else _maxrss_bytes()
    res = {"peak_memory_mb": max(0, peak - base) / _MIB, "baseline_rss_mb": base / _MIB,
           "peak_rss_mb": peak / _MIB, "model_memory_mb": _model_bytes(model) / _MIB,
           "load_rss_mb": (rss_loaded - rss_start) / _MIB if rss_start is not None and rss_loaded is not None
           else None,
           "method": "cpu-subprocess:" + ("clear_refs+VmHWM" if reset else "ru_maxrss (peak not resettable)"),
           "threads": torch.get_num_threads()}
    Path(out_path).write_text(json.dumps(res))


def peak_memory_cpu(model_path, input_size, *, threads: int | None = None, warmup: int = 1,
                    timeout: float = 600.0) -> dict:
    """Peak extra CPU memory (MiB) of one full-detector inference of the model saved at ``model_path``
    (:func:`edp_det.save_compressed` format), measured in a fresh Python subprocess (see the module docstring).

    Returns ``{"peak_memory_mb", "baseline_rss_mb", "peak_rss_mb", "model_memory_mb", "load_rss_mb", "method",
    "threads"}``. Raises ValueError if the file cannot be loaded or the subprocess fails.
    """
    input_size = _check_input_size(input_size)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ValueError(f"{model_path}: model file not found")
    threads = torch.get_num_threads() if threads is None else int(threads)
    pkg_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))   # fixed threshold: big frees go back to the OS
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    with tempfile.TemporaryDirectory(prefix="edp_peakmem_") as tmp:
        out = Path(tmp) / "result.json"
        code = ("import sys, json; from edp_det.deploy.benchmark import _peak_memory_child; "
                "_peak_memory_child(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), "
                "int(sys.argv[5]))")
        cmd = [sys.executable, "-c", code, str(model_path.resolve()), json.dumps(list(input_size)), str(out),
               str(threads), str(int(warmup))]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ValueError(f"{model_path}: peak-memory subprocess timed out after {timeout:.0f} s") from None
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
            raise ValueError(f"{model_path}: peak-memory subprocess failed (exit {proc.returncode}): "
                             f"{lines[-1] if lines else 'no output'}")
        return json.loads(out.read_text())


def peak_memory_cuda(model: nn.Module, img: torch.Tensor) -> dict:
    """Peak extra CUDA memory (MiB) of one ``model([img])`` (model and image already on the CUDA device)."""
    dev = img.device
    synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    with torch.no_grad():
        model([img])
    synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    return {"peak_memory_mb": max(0, peak - base) / _MIB, "peak_memory_total_mb": peak / _MIB,
            "model_memory_mb": _model_bytes(model) / _MIB, "method": "cuda:max_memory_allocated"}


def _peak_memory(model: nn.Module, model_path, img: torch.Tensor, input_size) -> dict:
    """Dispatch by device; on CPU without a file, the model is saved to a temporary file first."""
    if img.device.type == "cuda":
        return peak_memory_cuda(model, img)
    if img.device.type != "cpu":
        return {"peak_memory_mb": None, "method": f"unsupported on {img.device.type}"}
    if model_path is not None:
        return peak_memory_cpu(model_path, input_size)
    from edp_det.deploy.serialization import save_compressed

    with tempfile.TemporaryDirectory(prefix="edp_peakmem_") as tmp:
        path = Path(tmp) / "model.pt"
        try:
            save_compressed(model, path)
        except (ValueError, TypeError) as e:
            logger.warning("peak memory not measured: cannot save the model for the subprocess (%s); pass "
                           "model_path=", e)
            return {"peak_memory_mb": None, "method": f"not measured ({e})"}
        return peak_memory_cpu(path, input_size)


# ------------------------------------------------------------------------------------------------ detector
class _Prepared:
    """A detector in eval mode on ``device`` with its inputs, FLOPs and the callables that are timed."""

    def __init__(self, model: nn.Module, input_size, device: torch.device, name: str = "model",
                 optimize: bool = False):
        _check_detector(model, name)
        self.model = model
        self.was_training = model.training
        model.eval()
        model.to(device)
        self.img, self.batch = _make_inputs(model, input_size, device)
        self.inference_report = None
        self.network_size = _network_size(model, self.img)
        if self.network_size != tuple(input_size[1:]):
            logger.warning("%s: the detector transform turns a %dx%d image into a %dx%d network input "
                           "(min_size=%s, max_size=%s, padding to 32); FLOPs are counted at %dx%d. Pass the "
                           "network size as input_size.", name, input_size[1], input_size[2], *self.network_size,
                           model.transform.min_size, model.transform.max_size, input_size[1], input_size[2])
        self.params, self.flops_backbone, self.flops_detector = _flops(model, input_size)
        if optimize:   # the timed copy; the caller's model stays as it was
            from edp_det.deploy.inference import optimize_for_inference

            self.model = copy.deepcopy(model)
            self.model.eval()
            _, rep = optimize_for_inference(body_of(self.model), self.batch, inplace=True, return_report=True)
            self.inference_report = {"folded": len(rep.folded), "memory_format": rep.memory_format,
                                     "merged": len(rep.merged), "kept_split": len(rep.kept_split),
                                     "max_rel_err": rep.max_rel_err, "text": rep.format().splitlines()[0]}

    @torch.no_grad()
    def detector(self):
        return self.model([self.img])

    @torch.no_grad()
    def backbone(self):
        return body_of(self.model)(self.batch)

    def restore(self):
        self.model.train(self.was_training)


def benchmark_detector(model: nn.Module, input_size=(3, 800, 800), device="cpu", warmup: int = 5, iters: int = 20,
                       peak_memory: bool = True, model_path=None) -> dict:
    """Benchmark one torchvision detector (moved to ``device`` in place; its train/eval mode is restored).

    Args:
        model: a Faster R-CNN (e.g. from :func:`edp_det.load_compressed`).
        input_size: ``(C, H, W)`` of the image as the network sees it (see the module docstring).
        device: where to run; on CUDA every timing is synchronised.
        warmup / iters: untimed and timed calls per measurement.
        peak_memory: measure the peak inference memory (CPU: in a subprocess, from ``model_path`` or from a
            temporary :func:`edp_det.save_compressed` copy of ``model``).
        model_path: the file ``model`` was loaded from (CPU peak memory only).
    Returns:
        ``{"fps", "latency_ms", "latency_mean_ms", "latency_p90_ms", "backbone_fps", "backbone_latency_ms",
        "backbone_latency_p90_ms", "params", "flops_backbone", "flops_detector", "peak_memory_mb",
        "model_memory_mb", "memory", "device", "input_size", "network_size", "threads", "warmup", "iters"}``
        (latencies in ms, FLOPs per image, memory in MiB; ``peak_memory_mb`` is None if not measured).
    """
    input_size = _check_input_size(input_size)
    dev = _device(device)
    prep = _Prepared(model, input_size, dev)
    try:
        det = measure_latency(prep.detector, warmup=warmup, iters=iters, device=dev)
        bb = measure_latency(prep.backbone, warmup=warmup, iters=iters, device=dev)
        mem = _peak_memory(model, model_path, prep.img, input_size) if peak_memory else \
            {"peak_memory_mb": None, "method": "not requested"}
    finally:
        prep.restore()
    return {"fps": det["fps"], "latency_ms": det["median_ms"], "latency_mean_ms": det["mean_ms"],
            "latency_p90_ms": det["p90_ms"], "backbone_fps": bb["fps"], "backbone_latency_ms": bb["median_ms"],
            "backbone_latency_mean_ms": bb["mean_ms"], "backbone_latency_p90_ms": bb["p90_ms"],
            "params": prep.params, "flops_backbone": prep.flops_backbone, "flops_detector": prep.flops_detector,
            "peak_memory_mb": mem.get("peak_memory_mb"), "model_memory_mb": _model_bytes(model) / _MIB,
            "memory": mem, "device": str(dev), "input_size": list(input_size),
            "network_size": list(prep.network_size), "threads": torch.get_num_threads(), "warmup": warmup,
            "iters": iters}


def compare_side_by_side(models: dict[str, nn.Module], input_size=(3, 800, 800), device="cpu", rounds: int = 5,
                         iters_per_round: int = 10, warmup: int = 5, peak_memory: bool = False,
                         model_paths: dict | None = None, optimize: bool = False) -> dict:
    """Benchmark several detectors alternately; the first entry of ``models`` is the baseline.

    The full detectors and the backbone bodies of all models are the variants of
    :func:`edp_det.deploy.timing.time_alternating`: ``warmup`` untimed calls each, then ``rounds`` rounds in which
    each takes a turn of ``iters_per_round`` calls timed one by one (the order rotated every round), so slow phases
    of a noisy machine hit all models alike. Medians are over all ``rounds * iters_per_round`` calls.
    ``peak_memory``: also measure peak inference memory (CPU: one subprocess per model; ``model_paths[name]`` is
    used if given, else a temporary copy is saved).
    ``optimize``: time the *inference form* of every model instead — a copy whose backbone body went through
    :func:`edp_det.deploy.inference.optimize_for_inference` (norm layers folded, low-rank pairs merged where measured to be
    faster, memory format measured; outputs equal to float rounding). Params/FLOPs, the ideal speedups and the
    peak memory stay those of the models as given (the compressed architecture, not the folding).

    Returns::

        {"device", "input_size", "network_size", "threads", "rounds", "iters_per_round", "warmup", "baseline",
         "models": {name: {"latency_ms", "latency_p90_ms", "fps", "latency_round_medians_ms",
                           "backbone_latency_ms", "backbone_latency_p90_ms", "backbone_fps",
                           "backbone_round_medians_ms", "params", "flops_backbone", "flops_detector",
                           "peak_memory_mb", "model_memory_mb"}},
         "speedup": {name: {"backbone_measured", "backbone_ideal", "backbone_ratio",
                            "detector_measured", "detector_ideal", "detector_ratio"}}}

    where ``*_measured = latency_baseline / latency_model``, ``*_ideal = flops_baseline / flops_model`` and
    ``*_ratio = measured / ideal`` (1.0 = the FLOPs cut fully turned into speed).
    """
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict name -> detector")
    for k, v in (("rounds", rounds), ("iters_per_round", iters_per_round)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be an int >= 1, got {v!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if len({id(m) for m in models.values()}) != len(models):
        raise ValueError("models must be distinct module objects")
    input_size = _check_input_size(input_size)
    dev = _device(device)
    model_paths = dict(model_paths or {})
    preps = {name: _Prepared(m, input_size, dev, name, optimize=optimize) for name, m in models.items()}
    names = list(preps)
    variants = {**{("detector", n): preps[n].detector for n in names},
                **{("backbone", n): preps[n].backbone for n in names}}
    try:
        timed = time_alternating(variants, rounds=rounds, iters=iters_per_round, warmup=warmup, device=dev)
        mems = {}
        for n in names:
            mems[n] = (_peak_memory(preps[n].model, model_paths.get(n), preps[n].img, input_size) if peak_memory
                       else {"peak_memory_mb": None, "method": "not requested"})
    finally:
        for p in preps.values():
            p.restore()
    out_models = {}
    for n in names:
        d = _stats([s * 1000.0 for s in timed.pooled(("detector", n))])
        b = _stats([s * 1000.0 for s in timed.pooled(("backbone", n))])
        p = preps[n]
        out_models[n] = {
            "latency_ms": d["median_ms"], "latency_mean_ms": d["mean_ms"], "latency_p90_ms": d["p90_ms"],
            "fps": d["fps"],
            "latency_round_medians_ms": [v * 1000.0 for v in timed.round_values(("detector", n))],
            "backbone_latency_ms": b["median_ms"], "backbone_latency_mean_ms": b["mean_ms"],
            "backbone_latency_p90_ms": b["p90_ms"], "backbone_fps": b["fps"],
            "backbone_round_medians_ms": [v * 1000.0 for v in timed.round_values(("backbone", n))],
            "params": p.params, "flops_backbone": p.flops_backbone, "flops_detector": p.flops_detector,
            "peak_memory_mb": mems[n].get("peak_memory_mb"), "model_memory_mb": _model_bytes(p.model) / _MIB,
            "memory_method": mems[n].get("method"),
        }
        if p.inference_report is not None:
            out_models[n]["inference_form"] = p.inference_report
    base = out_models[names[0]]

    def ratio(a, b):
        return a / b if b else math.inf

    speedup = {}
    for n in names:
        m = out_models[n]
        bm, bi = ratio(base["backbone_latency_ms"], m["backbone_latency_ms"]), \
            ratio(base["flops_backbone"], m["flops_backbone"])
        dm, di = ratio(base["latency_ms"], m["latency_ms"]), ratio(base["flops_detector"], m["flops_detector"])
        speedup[n] = {"backbone_measured": bm, "backbone_ideal": bi, "backbone_ratio": ratio(bm, bi),
                      "detector_measured": dm, "detector_ideal": di, "detector_ratio": ratio(dm, di)}
    return {"device": str(dev), "input_size": list(input_size), "network_size": list(preps[names[0]].network_size),
            "threads": torch.get_num_threads(), "rounds": rounds, "iters_per_round": iters_per_round,
            "warmup": warmup, "baseline": names[0], "models": out_models, "speedup": speedup}


# ------------------------------------------------------------------------------------------------ report
def _fmt(v, spec: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def format_comparison(result: dict) -> str:
    """A readable text table of a :func:`compare_side_by_side` result."""
    names = list(result["models"])
    w = max(8, *(len(n) for n in names))
    c, h, wd = result["input_size"]
    lines = [f"device {result['device']} ({result['threads']} threads), input {c}x{h}x{wd} "
             f"(network {result['network_size'][0]}x{result['network_size'][1]}), "
             f"{result['rounds']} rounds x {result['iters_per_round']} iters, round-robin, medians",
             "",
             f"{'model':<{w}} {'params':>9} {'GFLOPs':>8} {'GFLOPs':>8} {'backbone':>10} {'backbone':>9} "
             f"{'detector':>10} {'detector':>9} {'peak mem':>9}",
             f"{'':<{w}} {'(M)':>9} {'backbone':>8} {'detector':>8} {'(ms)':>10} {'(FPS)':>9} "
             f"{'(ms)':>10} {'(FPS)':>9} {'(MiB)':>9}"]
    for n in names:
        m = result["models"][n]
        lines.append(f"{n:<{w}} {m['params'] / 1e6:>9.3f} {m['flops_backbone'] / 1e9:>8.3f} "
                     f"{m['flops_detector'] / 1e9:>8.3f} {m['backbone_latency_ms']:>10.2f} "
                     f"{m['backbone_fps']:>9.1f} {m['latency_ms']:>10.2f} {m['fps']:>9.1f} "
                     f"{_fmt(m.get('peak_memory_mb'), '.1f'):>9}")
    if len(names) > 1:
        base = result["baseline"]
        lines += ["", f"speedup vs {base!r} (measured = latency ratio, ideal = FLOPs ratio, ratio = measured/ideal)",
                  f"{'model':<{w}} {'backbone':>9} {'backbone':>9} {'backbone':>9} {'detector':>9} {'detector':>9} "
                  f"{'detector':>9}",
                  f"{'':<{w}} {'measured':>9} {'ideal':>9} {'ratio':>9} {'measured':>9} {'ideal':>9} {'ratio':>9}"]
        for n in names[1:]:
            s = result["speedup"][n]
            lines.append(f"{n:<{w}} {s['backbone_measured']:>8.2f}x {s['backbone_ideal']:>8.2f}x "
                         f"{s['backbone_ratio']:>9.2f} {s['detector_measured']:>8.2f}x {s['detector_ideal']:>8.2f}x "
                         f"{s['detector_ratio']:>9.2f}")
    return "\n".join(lines)
