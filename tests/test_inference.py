"""optimize_for_inference: BN folding (BatchNorm2d / FrozenBatchNorm2d, low-rank pairs), measured merges and
memory format keep the PM model's outputs. No timing asserts (decisions are measured, so tests force them)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det import EDPRegularizer, decompose, prune_and_merge
from edp_det.deploy.inference import fold_batchnorms, optimize_for_inference
from edp_det.ops.surgery import LowRankConv2d

from _core_helpers import one_thread, randomize_norms  # noqa: F401

FAST = dict(rounds=1, iters=1)


pytestmark = pytest.mark.usefixtures("one_thread")




_PM_CACHE: dict = {}


def _pm_resnet18(dtype):
    """A pruned-and-merged ResNet-18 (some pairs merged, some kept) with non-trivial BatchNorms, eval mode."""
    if not _PM_CACHE:
        torch.manual_seed(0)
        m = randomize_norms(resnet18(num_classes=7), 1).double()
        decompose(m)
        EDPRegularizer(m, lambda_rank=0.05, lambda_channel=0.05).prox_step(1.0)
        prune_and_merge(m, flops_target=0.5, input_size=(3, 32, 32))
        _PM_CACHE["pm"] = m.eval()
    return copy.deepcopy(_PM_CACHE["pm"]).to(dtype)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max())


def _lowrank_pairs(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, LowRankConv2d)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_optimized_pm_model_matches_pm_model_and_has_no_bn(dtype, tol):
    pm = _pm_resnet18(dtype)
    assert _lowrank_pairs(pm), "fixture should keep some low-rank pairs"
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    fast, report = optimize_for_inference(pm, x, return_report=True, **FAST)
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in fast.modules())
    assert len(report.folded) == 20            # every BN of ResNet-18 follows a conv
    with torch.no_grad():
        assert _rel(pm(x), fast(x)) < tol
        x2 = torch.randn(3, 3, 40, 36, dtype=dtype)   # other shapes too: the decisions only affect speed
        assert _rel(pm(x2), fast(x2)) < tol
    assert any(isinstance(m, nn.BatchNorm2d) for m in pm.modules()), "the input model must be left alone"


@pytest.mark.parametrize("merge_margin,channels_last", [(-math.inf, True), (math.inf, False)])
def test_forced_merge_decisions_and_memory_formats_are_exact(merge_margin, channels_last):
    pm = _pm_resnet18(torch.float64)
    n_pairs = len(_lowrank_pairs(pm))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fast, report = optimize_for_inference(pm, x, channels_last=channels_last, merge_margin=merge_margin,
                                          return_report=True, **FAST)
    if merge_margin < 0:        # every pair merged (BN already folded into coeff, so into the merged conv)
        assert len(report.merged) == n_pairs and not _lowrank_pairs(fast)
    else:                       # none merged: the folded BN lives in coeff's bias
        assert not report.merged and len(_lowrank_pairs(fast)) == n_pairs
        assert all(fast.get_submodule(n).coeff.bias is not None for n in _lowrank_pairs(fast))
    assert report.memory_format == ("channels_last" if channels_last else "contiguous")
    w = next(m.weight for m in fast.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    assert w.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with torch.no_grad():
        assert _rel(pm(x), fast(x)) < 1e-9


def test_frozen_batchnorm_is_folded():
    torch.manual_seed(0)
    m = randomize_norms(resnet18(num_classes=7, norm_layer=FrozenBatchNorm2d), 1).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fast = optimize_for_inference(m, x, measure_merge=False, channels_last=False)
    assert not any(isinstance(q, FrozenBatchNorm2d) for q in fast.modules())
    with torch.no_grad():
        assert _rel(m(x), fast(x)) < 1e-9


def test_decomposed_block_folds_into_coeff():
    torch.manual_seed(0)
    m = decompose(randomize_norms(resnet18(num_classes=7), 1).double()).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fast = optimize_for_inference(m, x, channels_last=False, **FAST)
    assert not any(isinstance(q, nn.BatchNorm2d) for q in fast.modules())
    with torch.no_grad():
        assert _rel(m(x), fast(x)) < 1e-9


class _SharedOutput(nn.Module):
    """conv output read by its BN *and* by a functional add: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_read_outside_its_norm_is_detected():
    m = randomize_norms(_SharedOutput(), 1).double().eval()
    with pytest.raises(ValueError, match="folding"):
        optimize_for_inference(m, torch.randn(1, 3, 8, 8, dtype=torch.float64), **FAST)


def test_bad_arguments():
    pm = _pm_resnet18(torch.float32)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="channels_last"):
        optimize_for_inference(pm, x, channels_last="yes")
    pm.train()
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorms(pm, x)
