"""Shared helpers of the core-library tests (test_block/decompose/regularizer/pruning/flops/serialization).

Building and decomposing a ResNet-50 / Faster R-CNN costs seconds on 2 CPU cores, so the pristine decomposed
models are built once per process (``functools.lru_cache``) and every test works on a ``copy.deepcopy``.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import edp_det
from edp_det import iter_blocks

# small detector settings: few proposals keep the ROI head cheap
DET_KW = dict(num_classes=3, min_size=64, max_size=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50,
              box_detections_per_img=20)

# the saved test detectors of test_benchmark.py and test_export.py
SAVED_DET_SIZE = (3, 96, 96)
SAVED_DET_ARCH = dict(num_classes=3, depth=18, norm="bn", min_size=96, max_size=96, rpn_pre_nms_top_n_test=100,
                      rpn_post_nms_top_n_test=50)


def saved_detector_files(tmp_path_factory):
    """(baseline, compressed) detector files, built once per session in the session's base temp folder. The
    compressed one: decompose + PM to a 40 % backbone FLOPs cut without layer weights (every stage cut, layer1
    included); ``init="identity"`` because SVD-initialising ResNet-18's wide layers costs tens of seconds on 2 CPU
    cores."""
    root = tmp_path_factory.getbasetemp() / "edp_compressed_models"
    root.mkdir(parents=True, exist_ok=True)
    base, comp = root / "baseline.pt", root / "compressed.pt"
    if not base.is_file():
        torch.manual_seed(0)
        edp_det.save_compressed(edp_det.build_model("fasterrcnn", **SAVED_DET_ARCH), base)
    if not comp.is_file():
        torch.manual_seed(0)
        m = edp_det.build_model("fasterrcnn", **SAVED_DET_ARCH)
        edp_det.decompose(m, init="identity")
        edp_det.prune_and_merge(m, flops_target=0.4, input_size=SAVED_DET_SIZE, layer_weights=None)
        edp_det.save_compressed(m, comp)
    return base, comp



@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Single intra-op thread for the module (2 shared cores: OpenMP spinning makes LAPACK many times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a|."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm2d / FrozenBatchNorm2d non-trivial running stats and affine params (so BN ≠ identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_mean.numel()
                dt = m.running_mean.dtype
                m.running_mean.copy_((torch.randn(n, generator=g) * 0.2).to(dt))
                m.running_var.copy_((torch.rand(n, generator=g) * 1.5 + 0.5).to(dt))
                m.weight.copy_((torch.rand(n, generator=g) * 0.8 + 0.4).to(dt))
                m.bias.copy_((torch.randn(n, generator=g) * 0.2).to(dt))
    return model


def build(name: str, dtype=torch.float64, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = edp_det.build_model(name, **kw)
    randomize_norms(model, seed + 1)
    return model.to(dtype).eval()


@functools.lru_cache(maxsize=None)
def _pristine(key):
    name, dtype, kw, dkw = key
    model = build(name, dtype=dtype, **dict(kw))
    original = copy.deepcopy(model)
    edp_det.decompose(model, **dict(dkw))
    return original, model


def cached(name: str, dtype=torch.float64, decompose_kw: dict | None = None, **kw):
    """``(original, decomposed)`` for a randomised model decomposed with ``decompose_kw``.

    ``decomposed`` is a private deep copy; ``original`` (the same weights before ``decompose``) is SHARED between
    tests: use it read-only (eval-mode forwards, ``count_flops``)."""
    key = (name, dtype, tuple(sorted(kw.items())), tuple(sorted((decompose_kw or {}).items())))
    original, model = _pristine(key)
    return original, copy.deepcopy(model)


def norm_of(model: nn.Module, block) -> nn.Module | None:
    return model.get_submodule(block.norm_name) if block.norm_name else None


@torch.no_grad()
def zero_row(model: nn.Module, block, i) -> None:
    """Zero the whole row group i (β row, bias, following-norm affine params)."""
    block.beta_2d()[i] = 0
    if block.coeff.bias is not None:
        block.coeff.bias[i] = 0
    norm = norm_of(model, block)
    if norm is not None:
        norm.weight[i] = 0
        norm.bias[i] = 0


@torch.no_grad()
def sparsify(model: nn.Module, seed: int, col_fracs=(0.1, 0.4, 0.8), row_fracs=(0.0, 0.25, 0.5),
             skip=()) -> dict:
    """Zero random β columns of every block and random whole row groups of channel-prunable blocks.

    Returns ``{name: (rank_left, channels_left)}`` (the numbers of groups not zeroed)."""
    g = torch.Generator().manual_seed(seed)
    left = {}
    for k, (name, b) in enumerate(iter_blocks(model)):
        if name in skip:
            left[name] = (b.rank, b.out_channels)
            continue
        cf = col_fracs[int(torch.randint(len(col_fracs), (1,), generator=g))]
        ncol = int(b.rank * cf)
        cols = torch.randperm(b.rank, generator=g)[:ncol]
        b.beta_2d()[:, cols] = 0
        nrow = 0
        if b.channel_prunable:
            rf = row_fracs[int(torch.randint(len(row_fracs), (1,), generator=g))]
            nrow = int(b.out_channels * rf)
            for i in torch.randperm(b.out_channels, generator=g)[:nrow].tolist():
                zero_row(model, b, i)
        left[name] = (b.rank - ncol, b.out_channels - nrow)
    return left


def det_image(seed: int = 0, dtype=torch.float64, size=(3, 50, 60)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*size, generator=g).to(dtype)


def assert_det_close(a: list, b: list, tol: float) -> None:
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert set(da) == set(db)
        assert da["boxes"].shape[0] > 0, "detector produced no boxes: the comparison would be vacuous"
        assert torch.equal(da["labels"], db["labels"])
        assert rel_err(da["boxes"], db["boxes"]) <= tol
        assert rel_err(da["scores"], db["scores"]) <= tol
