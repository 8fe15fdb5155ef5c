"""FLOPs and parameter counting on the real module.

Convention (the paper's): only convolution and linear layers count, multiplications and additions both counted,
i.e. 2 FLOPs per multiply-add (bias additions and norm/activation layers are not counted). A CompressedAwareConv2d
counts as its two convolutions θ' and β (its structural cost, whatever forward mode it runs in). A module with a
``macs_per_position()`` method (:mod:`edp_det.ops.layers`: masked and low-rank + sparse convolutions) is counted as one
unit, ``2 · macs_per_position() · output positions`` (only its non-zero sparse weights count).

Counting runs one forward pass with hooks on a zero input of ``input_size = (C, H, W)`` (batch 1) in the model's
dtype and on its device. For a torchvision detector, ``input_size`` is the size of the image *as the network sees
it* (after ``model.transform``'s resize); the pass runs backbone body → FPN → RPN head → ROI box head on
``rpn.post_nms_top_n`` (testing) proposals, and FLOPs are reported per part
(:data:`edp_det.ops.adapter.DETECTOR_PARTS`: the ResNet body, the FPN, the RPN and the ROI heads).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from edp_det.ops.adapter import DETECTOR_PARTS, is_detector, under, unwrap_model
from edp_det.ops.block import CompressedAwareConv2d

__all__ = ["count_flops", "FlopsReport", "ModuleFlops", "DETECTOR_PARTS", "flops_cut", "cut_reaches"]

@dataclass
class ModuleFlops:
    name: str
    kind: str               # "conv", "linear" or "edp_block"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    positions: int          # output positions of the call(s): batch × H'·W' (rows for linear)
    params: int
    flops: int
    rank: int | None = None
    orig_flops: int | None = None   # FLOPs of the conv this block replaced (blocks only)
    calls: int = 1          # forward calls summed into this record (the RPN head runs once per FPN level)


@dataclass
class FlopsReport:
    """What :func:`count_flops` measured: ``params`` and ``flops`` (2 per multiply-add, conv and linear layers) of
    the whole model, per-module records (``modules``) and, for detectors, per-part ``{"params", "flops"}``
    (``parts``), at ``input_size``."""

    params: int
    flops: int
    modules: list[ModuleFlops] = field(default_factory=list)
    parts: dict[str, dict[str, int]] = field(default_factory=dict)
    input_size: tuple[int, ...] = ()

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def module(self, name: str) -> ModuleFlops:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def flops_under(self, prefix: str = "") -> int:
        """FLOPs of all counted modules whose name starts with ``prefix``."""
        return sum(m.flops for m in self.modules if under(m.name, prefix))

    def original_flops_under(self, prefix: str = "") -> int:
        """FLOPs under ``prefix`` if every CompressedAwareConv2d were still its original convolution."""
        return sum((m.orig_flops if m.orig_flops is not None else m.flops) for m in self.modules
                   if under(m.name, prefix))

    def to_dict(self) -> dict:
        return {"params": self.params, "flops": self.flops, "parts": self.parts, "input_size": list(self.input_size)}

    def format_table(self, max_rows: int | None = None) -> str:
        rows = self.modules if max_rows is None else self.modules[:max_rows]
        lines = [f"{'module':<48} {'kind':<9} {'c_in':>5} {'r':>5} {'c_out':>5} {'k':>5} {'MFLOPs':>10}"]
        for m in rows:
            r = "" if m.rank is None else str(m.rank)
            lines.append(f"{m.name:<48} {m.kind:<9} {m.in_channels:>5} {r:>5} {m.out_channels:>5} "
                         f"{m.kernel[0]}x{m.kernel[1]:<3} {m.flops / 1e6:>10.2f}")
        lines.append(f"total: {self.params / 1e6:.3f} M params, {self.flops / 1e9:.3f} GFLOPs")
        for part, d in self.parts.items():
            lines.append(f"  {part:<16} {d['params'] / 1e6:8.3f} M params {d['flops'] / 1e9:9.3f} GFLOPs")
        return "\n".join(lines)


def flops_cut(original: int, after: int) -> float:
    """The cut ``(original − after) / original`` of integer counts as one correctly rounded division.

    Rounding is monotonic, so whenever the exact cut is ≥ a float ``target`` (see :func:`cut_reaches`), the
    returned float is ≥ ``target`` too, on every machine (``1 − after / original`` rounds twice and can fall
    below it)."""
    original, after = int(original), int(after)
    if original <= 0:
        raise ValueError(f"original FLOPs must be positive, got {original}")
    return (original - after) / original


def cut_reaches(original: int, after: int, target: float) -> bool:
    """Whether the exact rational cut ``(original − after) / original`` is ≥ ``target`` (no float rounding)."""
    original, after = int(original), int(after)
    if original <= 0:
        raise ValueError(f"original FLOPs must be positive, got {original}")
    return Fraction(original - after, original) >= Fraction(target)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def _run_detector(model: nn.Module, x: torch.Tensor) -> None:
    feats = model.backbone(x)
    if not isinstance(feats, dict):
        feats = {"0": feats}
    fl = list(feats.values())
    model.rpn.head(fl)
    n = int(model.rpn._post_nms_top_n["testing"])
    h, w = x.shape[-2:]
    # deterministic proposals spread over the image
    g = torch.linspace(0, 1, n, dtype=x.dtype, device=x.device)
    boxes = torch.stack([g * w * 0.5, g * h * 0.5, g * w * 0.5 + w * 0.5, g * h * 0.5 + h * 0.5], dim=1)
    rh = model.roi_heads
    pooled = rh.box_roi_pool(feats, [boxes], [(h, w)])
    rep = rh.box_head(pooled)
    rh.box_predictor(rep)


def count_flops(model: nn.Module, input_size=(3, 224, 224), example_inputs=None) -> FlopsReport:
    """Count params and FLOPs of ``model`` (see module docstring for the convention).

    Args:
        model: any ``nn.Module`` taking one image batch, or a torchvision detector (handled part by part).
        input_size: ``(C, H, W)``; a batch-1 zero tensor in the model's dtype/device is used.
        example_inputs: alternatively a tensor (or tuple of args) to call the model with.
    Returns:
        FlopsReport with ``params`` (all parameters), ``flops`` (per image), a per-module table and, for
        detectors, ``parts`` = per-part ``{"params", "flops"}``.
    """
    model = unwrap_model(model)
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    if example_inputs is None:
        if len(input_size) != 3 or not all(isinstance(v, int) and v > 0 for v in input_size):
            raise ValueError(f"input_size must be (C, H, W) positive ints, got {input_size!r}")
        example_inputs = torch.zeros((1, *input_size), dtype=dtype, device=device)
    records: list[ModuleFlops] = []
    hooks = []
    skip = set()
    for name, m in model.named_modules():
        if isinstance(m, CompressedAwareConv2d):
            skip.update(f"{name}.{c}" for c in ("basis", "coeff"))
        elif _compound(m):   # counted as one unit: its children are not counted on their own
            skip.update(f"{name}.{c}" for c, _ in m.named_modules() if c)
    for name, m in model.named_modules():
        if name in skip:
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear, CompressedAwareConv2d)) or _compound(m):
            hooks.append(m.register_forward_hook(_make_hook(name, records)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if is_detector(model) and isinstance(example_inputs, torch.Tensor):
                _run_detector(model, example_inputs)
            elif isinstance(example_inputs, tuple):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # a module called several times (e.g. the RPN head on each level) is summed into one record
    merged: dict[str, ModuleFlops] = {}
    for r in records:
        if r.name in merged:
            m = merged[r.name]
            m.flops += r.flops
            m.positions += r.positions
            m.calls += r.calls
            if m.orig_flops is not None:
                m.orig_flops += r.orig_flops
        else:
            merged[r.name] = r
    mods = list(merged.values())
    report = FlopsReport(params=_params(model), flops=sum(m.flops for m in mods), modules=mods,
                         input_size=tuple(example_inputs.shape[1:]) if isinstance(example_inputs, torch.Tensor)
                         else ())
    if is_detector(model):
        for part in DETECTOR_PARTS:
            try:
                sub = model.get_submodule(part)
            except AttributeError:
                continue
            report.parts[part] = {"params": _params(sub), "flops": report.flops_under(part)}
    return report


def _compound(module: nn.Module) -> bool:
    """Modules that say how many multiply-adds they do per output position (``macs_per_position()``)."""
    return callable(getattr(module, "macs_per_position", None))


def _make_hook(name: str, records: list):
    def hook(module, inputs, output):
        out = output if isinstance(output, torch.Tensor) else output[0]
        n = out.shape[0] if out.dim() > 0 else 1
        if isinstance(module, CompressedAwareConv2d):
            kh, kw = module.kernel_size
            pos = out[0, 0].numel() if out.dim() == 4 else 0
            c_in, r, c_out = module.in_channels, module.rank, module.out_channels
            flops = 2 * n * pos * r * (c_in * kh * kw + c_out)
            orig = 2 * n * pos * module.orig_out_channels * module.orig_in_channels * kh * kw
            records.append(ModuleFlops(name, "edp_block", c_in, c_out, (kh, kw), n * pos,
                                       _params(module), flops, rank=r, orig_flops=orig))
        elif _compound(module):   # e.g. edp_det.ops.layers: masked / low-rank + sparse convs (nonzero weights only)
            pos = out[0, 0].numel() if out.dim() == 4 else 0
            kernel = tuple(getattr(module, "kernel_size", (1, 1)))
            records.append(ModuleFlops(name, getattr(module, "flops_kind", "custom"), module.in_channels,
                                       module.out_channels, kernel,
                                       n * pos, _params(module), 2 * n * pos * int(module.macs_per_position()),
                                       rank=getattr(module, "rank", None)))
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            pos = out[0, 0].numel()
            flops = 2 * n * pos * module.out_channels * (module.in_channels // module.groups) * kh * kw
            records.append(ModuleFlops(name, "conv", module.in_channels, module.out_channels, (kh, kw),
                                       n * pos, _params(module), flops))
        else:  # Linear
            rows = out.numel() // module.out_features if module.out_features else 0
            flops = 2 * rows * module.in_features * module.out_features
            records.append(ModuleFlops(name, "linear", module.in_features, module.out_features, (1, 1), rows,
                                       _params(module), flops))
    return hook
