"""Export (compressed) torchvision Faster R-CNN detectors to ONNX and TorchScript.

What is exported (``part``):

* ``"detector"`` — the whole detector with pre- and post-processing: input one image ``[C, H, W]`` (float, 0..1,
  as for ``model([img])``), outputs ``boxes [N, 4]`` (xyxy, pixels of the input image), ``labels [N]`` (int64),
  ``scores [N]`` for the ``N`` detections kept (N is data-dependent).
* ``"backbone"`` — ``model.backbone`` (ResNet body + FPN): input ``[B, C, H, W]`` (already normalised, at the
  network size), outputs one feature map per FPN level in the backbone's order (torchvision's levels ``"0"``,
  ``"1"``, ... and ``"pool"``: as many as ``returned_layers`` plus the pooled one; named ``feat0``, ``feat1``, ...,
  ``pool`` in ONNX, a dict with the level names in TorchScript).

ONNX: ``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``, opset 17 by default), which
handles torchvision's detection models (RoIAlign, NMS, data-dependent shapes); the torch.export-based exporter
(``dynamo=True``, needs ``onnxscript``) is tried next if the first one fails. By default H and W (and the backbone's
batch) are dynamic axes; ``dynamic=False`` specialises the graph to ``input_size`` (other sizes are rejected).

TorchScript: ``torch.jit.script`` (the detector scripts as torchvision supports it; a scripted torchvision
detector returns a ``(losses, detections)`` tuple), falling back to ``torch.jit.trace`` for the backbone.

If the whole detector cannot be exported, :func:`export_model` exports the backbone + FPN instead (unless
``fallback=False``) and says so in the returned :class:`ExportResult` (``part`` vs ``requested_part`` and
``fallback_reason``).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from edp_det.runtime.errors import caused_by_interrupt

logger = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportResult", "export_model", "export_onnx", "export_torchscript", "verify_onnx",
           "verify_torchscript", "verify_detections",
           "example_inputs", "backbone_levels", "onnx_level_names", "run_pytorch",
           "onnx_opset_range", "FORMATS", "PARTS", "DEFAULT_OPSET", "MIN_OPSET"]

FORMATS = ("onnx", "torchscript")
PARTS = ("detector", "backbone")
DEFAULT_OPSET = 17
MIN_OPSET = 11   # RoIAlign / NMS of torchvision's detection models
DETECTOR_OUTPUTS = ("boxes", "labels", "scores")


class ExportError(RuntimeError):
    """No exporter could export the model (the message lists every attempt)."""


@dataclass
class ExportResult:
    """What was written. ``part`` is what the file holds; it differs from ``requested_part`` after a fallback."""

    path: str
    format: str
    part: str
    requested_part: str
    method: str                       # e.g. "torch.onnx.export(dynamo=False, opset=17)", "torch.jit.script"
    input_size: tuple[int, int, int]
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    dynamic: bool = False
    fallback_reason: str | None = None
    errors: list[str] = field(default_factory=list)   # one line per failed attempt

    @property
    def fell_back(self) -> bool:
        return self.part != self.requested_part

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    def _static_note(self) -> str:
        size = "x".join(map(str, self.input_size[1:]))
        if self.format == "onnx":
            return f"static {size} only (the file rejects other image sizes; export with dynamic=True for any size)"
        return f"at {'x'.join(map(str, self.input_size))}"

    def summary(self) -> str:
        what = {"detector": "full detector (pre-processing, backbone+FPN, RPN, ROI heads, post-processing)",
                "backbone": "backbone + FPN only (model.backbone)"}[self.part]
        lines = [f"exported {what} as {self.format} to {self.path}",
                 f"  method: {self.method}; input {', '.join(self.input_names) or '-'} "
                 f"{'(dynamic H, W)' if self.dynamic else self._static_note()}; "
                 f"outputs {', '.join(self.output_names) or '-'}"]
        if self.fell_back:
            lines.append(f"  NOTE: the {self.requested_part} could not be exported ({self.fallback_reason}); "
                         f"exported the {self.part} instead — see docs/EXPORT.md")
        return "\n".join(lines)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".strip()


def onnx_opset_range() -> tuple[int, int | None, str]:
    """``(lowest, highest, note)``: the ONNX opsets :func:`export_onnx` can write with the installed torch.

    The highest is that of the TorchScript-based exporter, or of the torch.export-based one where ``onnxscript``
    is installed (None when this torch does not say); ``note`` names what a higher opset would need ("" if
    nothing)."""
    import importlib.util

    try:
        from torch.onnx import _constants as c
        ts_max, any_max = int(c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET), int(c.ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        return MIN_OPSET, None, ""
    if any_max > ts_max and importlib.util.find_spec("onnxscript") is None:
        return MIN_OPSET, ts_max, f"up to {any_max} with the onnxscript package"
    return MIN_OPSET, max(ts_max, any_max), ""


def _check_path(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output path {path} is a directory; give a file name")
    return path


def _check_args(model, fmt, part, input_size):
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if not all(hasattr(model, a) for a in ("backbone", "rpn", "roi_heads", "transform")):
        raise ValueError(f"expected a torchvision Faster R-CNN (backbone, rpn, roi_heads, transform), got a "
                         f"{type(model).__name__}")
    try:
        t = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 3 or any(v <= 0 for v in t):
        raise ValueError(f"input_size must be (C, H, W) positive ints, got {input_size!r}")
    return t


def _dtype_device(model: nn.Module):
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


def example_inputs(model: nn.Module, input_size, part: str = "detector", seed: int = 0) -> torch.Tensor:
    """A deterministic random input for ``part``: an image ``[C, H, W]`` in [0, 1] (detector) or a batch
    ``[1, C, H, W]`` (backbone), in the model's dtype and on its device."""
    dtype, device = _dtype_device(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tuple(input_size), generator=g).to(device=device, dtype=dtype)
    return x if part == "detector" else x.unsqueeze(0)


class _DetectorOutputs(nn.Module):
    """Wraps a detector so that one image in gives ``(boxes, labels, scores)`` out (a flat tuple, for tracing)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        det = self.model([image])[0]
        return det["boxes"], det["labels"], det["scores"]


class _BackboneOutputs(nn.Module):
    """``model.backbone`` with its OrderedDict of FPN levels as a flat tuple."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor):
        return tuple(self.backbone(images).values())


@torch.no_grad()
def backbone_levels(backbone: nn.Module, x: torch.Tensor) -> list[str]:
    """The names of the feature maps ``backbone`` returns for ``x``, in order (e.g. ``["0", "1", "2", "pool"]``
    for an FPN over three stages)."""
    return [str(k) for k in backbone(x).keys()]


def onnx_level_names(levels) -> list[str]:
    """ONNX output names of the backbone's levels: ``feat<k>`` for torchvision's numbered levels, the name
    itself otherwise (``pool``)."""
    return [f"feat{k}" if k.isdigit() else k for k in levels]


@torch.no_grad()
def run_pytorch(model: nn.Module, x: torch.Tensor, part: str = "detector") -> list[torch.Tensor]:
    """The PyTorch reference outputs in the exported order (``boxes, labels, scores`` or the FPN levels)."""
    if part == "detector":
        det = model([x])[0]
        return [det[k] for k in DETECTOR_OUTPUTS]
    return list(model.backbone(x).values())


class _Mode:
    """Put the model in evaluation mode for the duration of an export; restores train mode afterwards."""

    def __init__(self, model):
        self.model, self.training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.training)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _replace(tmp: Path, path: Path) -> None:
    """Move the finished temp file onto ``path``; the temp file never outlives a failure."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------- ONNX
def _onnx_attempt(model, part, x, path, opset, dynamic, dynamo: bool):
    if part == "detector":
        module = _DetectorOutputs(model)
        input_names, output_names = ["image"], list(DETECTOR_OUTPUTS)
        axes = {"image": {1: "height", 2: "width"}} if dynamic else None
    else:
        module = _BackboneOutputs(model.backbone)
        input_names, output_names = ["images"], onnx_level_names(backbone_levels(model.backbone, x))
        axes = ({"images": {0: "batch", 2: "height", 3: "width"},
                 **{o: {0: "batch", 2: f"h_{o}", 3: f"w_{o}"} for o in output_names}} if dynamic else None)
    kwargs = dict(input_names=input_names, output_names=output_names, opset_version=opset,
                  do_constant_folding=True)
    if dynamo:
        if dynamic:
            kwargs["dynamic_axes"] = axes
        prog = torch.onnx.export(module, (x,), None, dynamo=True, **kwargs)
        prog.save(str(path))
    else:
        torch.onnx.export(module, (x,), str(path), dynamo=False, dynamic_axes=axes, **kwargs)
    return input_names, output_names


def export_onnx(model: nn.Module, path, input_size=(3, 800, 800), part: str = "detector", *,
                opset: int = DEFAULT_OPSET, dynamic: bool = True, fallback: bool = True,
                check: bool = True) -> ExportResult:
    """Export ``model`` (or its backbone + FPN) to an ONNX file; see the module docstring.

    Args:
        model: a torchvision Faster R-CNN (e.g. from :func:`edp_det.load_compressed`), on any device.
        path: output ``.onnx`` file (parent folders are created; an existing folder is refused). It is written
            to a temporary file next to it first and replaced at the end: a failed or interrupted export leaves
            no partial file.
        input_size: ``(C, H, W)`` of the example image (use the network size, e.g. ``(3, min_size, min_size)``).
        part: ``"detector"`` or ``"backbone"``.
        opset: ONNX opset, from 11 (detection models) to the highest the installed exporter writes
            (:func:`onnx_opset_range`).
        dynamic: make H, W (and the backbone's batch) dynamic axes (default). ``False`` specialises the graph
            to ``input_size``: ONNX Runtime then rejects images of any other size.
        fallback: if the detector cannot be exported, export the backbone + FPN instead.
        check: run ``onnx.checker.check_model`` on the result.
    Raises:
        ValueError on bad arguments; ExportError (a RuntimeError) if nothing could be exported.
    """
    input_size = _check_args(model, "onnx", part, input_size)
    lo, hi, note = onnx_opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < lo or (hi is not None and opset > hi):
        raise ValueError(f"opset must be an int from {lo} to {hi if hi is not None else 'the highest torch supports'}"
                         f"{f' ({note})' if note else ''}, got {opset!r}")
    path = _check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [part] + (["backbone"] if part == "detector" and fallback else [])
    errors: list[str] = []
    with _Mode(model):
        for p in parts:
            x = example_inputs(model, input_size, p)
            for dynamo in (False, True):
                method = f"torch.onnx.export(dynamo={dynamo}, opset={opset})"
                tmp = _tmp_path(path)
                try:
                    with warnings.catch_warnings(), torch.no_grad():
                        warnings.simplefilter("ignore")   # the exporters emit many tracer/deprecation warnings
                        input_names, output_names = _onnx_attempt(model, p, x, tmp, opset, dynamic, dynamo)
                    if check:
                        import onnx

                        onnx.checker.check_model(str(tmp))
                except BaseException as e:  # noqa: BLE001 - exporter failures come in many types
                    tmp.unlink(missing_ok=True)   # also on Ctrl-C: no partial file is left
                    if not isinstance(e, Exception) or caused_by_interrupt(e):
                        raise
                    errors.append(f"{p} via {method}: {_first_line(e)}")
                    logger.info("ONNX export of the %s via %s failed: %s", p, method, _first_line(e))
                    continue
                _replace(tmp, path)
                res = ExportResult(str(path), "onnx", p, part, method, input_size, input_names, output_names,
                                   dynamic, None, errors)
                if p != part:
                    res.fallback_reason = errors[0] if errors else "unknown"
                    logger.warning("the %s could not be exported to ONNX (%s); exported the backbone + FPN",
                                   part, res.fallback_reason)
                return res
    raise ExportError("ONNX export failed: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------- TorchScript
def export_torchscript(model: nn.Module, path, input_size=(3, 800, 800), part: str = "detector", *,
                       fallback: bool = True) -> ExportResult:
    """Save ``model`` (or its backbone + FPN) as TorchScript (``torch.jit.save``); see the module docstring.

    The detector is scripted (``torch.jit.script``; the scripted module returns ``(losses, detections)``). The
    backbone is scripted, or traced at ``input_size`` if scripting fails. Load with ``torch.jit.load``.
    """
    input_size = _check_args(model, "torchscript", part, input_size)
    path = _check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [part] + (["backbone"] if part == "detector" and fallback else [])
    errors: list[str] = []
    with _Mode(model):
        for p in parts:
            module = model if p == "detector" else model.backbone
            attempts = [("torch.jit.script", None)]
            if p == "backbone":
                attempts.append(("torch.jit.trace", example_inputs(model, input_size, p)))
            for method, x in attempts:
                tmp = _tmp_path(path)
                try:
                    with warnings.catch_warnings(), torch.no_grad():
                        warnings.simplefilter("ignore")   # torch.jit is deprecated (FutureWarning) in torch 2.x
                        sm = torch.jit.script(module) if x is None else torch.jit.trace(module, x, strict=False)
                        torch.jit.save(sm, str(tmp))
                except BaseException as e:  # noqa: BLE001
                    tmp.unlink(missing_ok=True)
                    if not isinstance(e, Exception) or caused_by_interrupt(e):
                        raise
                    errors.append(f"{p} via {method}: {_first_line(e)}")
                    logger.info("TorchScript export of the %s via %s failed: %s", p, method, _first_line(e))
                    continue
                _replace(tmp, path)
                res = ExportResult(str(path), "torchscript", p, part, method, input_size,
                                   ["images: list of [C, H, W]"] if p == "detector" else ["images"],
                                   ["(losses, detections)"] if p == "detector"
                                   else backbone_levels(model.backbone, example_inputs(model, input_size, p)),
                                   method == "torch.jit.script", None, errors)
                if p != part:
                    res.fallback_reason = errors[0] if errors else "unknown"
                    logger.warning("the %s could not be exported to TorchScript (%s); exported the backbone + FPN",
                                   part, res.fallback_reason)
                return res
    raise ExportError("TorchScript export failed: " + "; ".join(errors))


def export_model(model: nn.Module, path, format: str = "onnx", input_size=(3, 800, 800), part: str = "detector",
                 **kwargs) -> ExportResult:
    """Dispatch to :func:`export_onnx` or :func:`export_torchscript`."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    fn = export_onnx if format == "onnx" else export_torchscript
    return fn(model, path, input_size, part, **kwargs)


# ---------------------------------------------------------------------------------------------------- checks
def _max_diff(ours: list[torch.Tensor], ref: list[torch.Tensor], names, rtol, atol) -> dict:
    if len(ours) != len(ref):
        return {"ok": False, "reason": f"{len(ours)} outputs, expected {len(ref)}", "max_abs_diff": None}
    worst, ok, reason = 0.0, True, None
    for name, a, b in zip(names, ours, ref):
        a, b = a.detach().cpu(), b.detach().cpu()
        if tuple(a.shape) != tuple(b.shape):
            return {"ok": False, "reason": f"output {name!r}: shape {tuple(a.shape)} vs {tuple(b.shape)}",
                    "max_abs_diff": None}
        if a.numel() == 0:
            continue
        a64, b64 = a.double(), b.double()
        worst = max(worst, float((a64 - b64).abs().max()))
        if not torch.allclose(a64, b64, rtol=rtol, atol=atol):
            ok, reason = False, reason or f"output {name!r} differs beyond rtol={rtol}, atol={atol}"
    return {"ok": ok, "reason": reason, "max_abs_diff": worst}


def _exported_runner(result: ExportResult, device):
    """A function ``x -> list of output tensors`` running the exported file (ONNX via ONNX Runtime on the CPU,
    TorchScript on ``device``) on one input as :func:`run_pytorch` takes it."""
    if result.format == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError("verifying an ONNX file needs onnxruntime (pip install onnxruntime)") from None
        sess = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: [torch.from_numpy(o) for o in sess.run(None, {name: x.detach().cpu().numpy()})]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = torch.jit.load(result.path, map_location=device)
    sm.eval()

    @torch.no_grad()
    def run(x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if result.part == "detector":
                out = sm([x])
                det = out[1][0] if isinstance(out, tuple) else out[0]   # scripted detectors: (losses, detections)
                return [det[k] for k in DETECTOR_OUTPUTS]
            return list(sm(x).values())
    return run


def _output_names(result: ExportResult) -> list[str]:
    if result.format == "torchscript" and result.part == "detector":
        return list(DETECTOR_OUTPUTS)
    return list(result.output_names)


def _verify_one(result: ExportResult, model: nn.Module, x, rtol, atol) -> dict:
    with _Mode(model):
        if x is None:
            x = example_inputs(model, result.input_size, result.part)
        ref = run_pytorch(model, x, result.part)
    ours = _exported_runner(result, x.device)(x)
    res = _max_diff(ours, ref, _output_names(result), rtol, atol)
    res["num_outputs"] = len(ours)
    return res


def verify_onnx(result: ExportResult, model: nn.Module, x: torch.Tensor | None = None, rtol: float = 1e-3,
                atol: float = 1e-4) -> dict:
    """Run the exported file with ONNX Runtime (CPU) and compare with PyTorch on ``x`` (default: the export's
    example input). Returns ``{"ok", "reason", "max_abs_diff", "num_outputs"}``. Needs ``onnxruntime``.
    A random input usually gives a trained detector no detections: see :func:`verify_detections`."""
    return _verify_one(result, model, x, rtol, atol)


def verify_torchscript(result: ExportResult, model: nn.Module, x: torch.Tensor | None = None, rtol: float = 1e-3,
                       atol: float = 1e-4) -> dict:
    """Load the saved TorchScript module and compare it with PyTorch on ``x``."""
    return _verify_one(result, model, x, rtol, atol)


def verify_detections(result: ExportResult, model: nn.Module, images: list, rtol: float = 1e-3,
                      atol: float = 1e-4) -> dict:
    """Compare an exported detector with PyTorch on real ``images`` (``[C, H, W]`` tensors in [0, 1]).

    A comparison only means something where PyTorch detects objects: ``void`` is True when it detects nothing on
    any image, and ``ok`` is then False. A static-size ONNX file accepts only ``result.input_size``: images of
    another size are resized to it first (counted in ``resized``). Returns ``{"ok", "void", "reason", "images",
    "detections" (PyTorch's count per image), "max_box_diff" (pixels), "max_score_diff", "labels_equal",
    "resized"}``.
    """
    if result.part != "detector":
        raise ValueError(f"verify_detections needs an exported detector, the file holds the {result.part}")
    if not images:
        raise ValueError("verify_detections: no images given")
    dtype, device = _dtype_device(model)
    run = _exported_runner(result, device)
    static = result.format == "onnx" and not result.dynamic
    out = {"ok": True, "void": False, "reason": None, "images": len(images), "detections": [],
           "max_box_diff": 0.0, "max_score_diff": 0.0, "labels_equal": True, "resized": 0}
    for i, img in enumerate(images):
        x = img.to(device=device, dtype=dtype)
        if static and tuple(x.shape) != tuple(result.input_size):
            x = torch.nn.functional.interpolate(x[None], size=tuple(result.input_size[1:]), mode="bilinear",
                                                align_corners=False)[0]
            out["resized"] += 1
        with _Mode(model):
            ref = run_pytorch(model, x, "detector")
        ours = run(x)
        out["detections"].append(int(ref[0].shape[0]))
        diff = _max_diff(ours, ref, list(DETECTOR_OUTPUTS), rtol, atol)
        if diff["max_abs_diff"] is None:   # a different number of detections
            out["ok"], out["labels_equal"] = False, False
            out["reason"] = out["reason"] or f"image {i}: {diff['reason']}"
            continue
        (bo, lo, so), (br, lr, sr) = [[t.detach().cpu().double() for t in o] for o in (ours, ref)]
        if br.numel():
            out["max_box_diff"] = max(out["max_box_diff"], float((bo - br).abs().max()))
            out["max_score_diff"] = max(out["max_score_diff"], float((so - sr).abs().max()))
            out["labels_equal"] &= bool(torch.equal(lo, lr))
        if not diff["ok"]:
            out["ok"] = False
            out["reason"] = out["reason"] or f"image {i}: {diff['reason']}"
    if sum(out["detections"]) == 0:
        out["ok"], out["void"] = False, True
        out["reason"] = (f"PyTorch detects nothing on the {len(images)} image(s), so no output was compared: the "
                         "check is void")
    return out
