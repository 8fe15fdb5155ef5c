"""CompressedAwareConv2d: function-preserving construction, rank, SVD ordering, forward modes, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edp_det import CompressedAwareConv2d

# (c_in, c_out, k, stride, padding, dilation, bias)
CONVS = [
    (4, 6, 3, 1, 1, 1, True),      # c_out ≤ c_in·k²: r = c_out
    (5, 7, 3, 2, 1, 1, False),     # stride 2
    (3, 8, (3, 5), 2, (2, 1), (2, 1), True),   # rectangular kernel, padding, dilation
    (2, 24, 3, 1, 0, 1, True),     # c_out > c_in·k² = 18: r = 18
    (8, 16, 1, 1, 0, 1, False),    # 1×1 blow-up case: r = c_in = 8
    (16, 8, 1, 2, 0, 1, True),     # 1×1 reduce, stride 2: r = c_out = 8
    (3, 16, 7, 2, 3, 1, False),    # stem-like
]


def _conv(c_in, c_out, k, stride, padding, dilation, bias, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv


def _kk(k):
    return k[0] * k[1] if isinstance(k, tuple) else k * k


@pytest.mark.parametrize("init", ["svd", "identity"])
@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "x".join(map(str, s[:3])) + f"-s{s[3]}")
def test_from_conv_is_function_preserving(spec, init):
    c_in, c_out, k, *_ = spec
    conv = _conv(*spec)
    block = CompressedAwareConv2d.from_conv(conv, init=init)
    # full rank, never blown up beyond min(c_out, c_in·k·k)
    assert block.rank == min(c_out, c_in * _kk(k))
    assert (block.in_channels, block.out_channels) == (c_in, c_out)
    assert block.basis.stride == conv.stride and block.basis.padding == conv.padding
    assert block.basis.dilation == conv.dilation and block.coeff.kernel_size == (1, 1)
    assert (block.coeff.bias is not None) == (conv.bias is not None)
    assert block.coeff.weight.dtype == torch.float64
    x = torch.randn(2, c_in, 13, 11, dtype=torch.float64)
    ref = conv(x)
    for mode in ("two_conv", "effective", "auto"):
        block.forward_mode = mode
        out = block(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12 * ref.abs().max().item())
    torch.testing.assert_close(block.effective_weight(), conv.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "x".join(map(str, s[:3])))
def test_svd_columns_ordered_by_singular_value(spec):
    c_in, c_out, k, *_ = spec
    conv = _conv(*spec, seed=3)
    block = CompressedAwareConv2d.from_conv(conv, init="svd")
    col = block.beta_2d().norm(dim=0)
    row = block.basis.weight.reshape(block.rank, -1).norm(dim=1)
    s = torch.linalg.svdvals(conv.weight.detach().reshape(c_out, -1))
    assert bool((col[:-1] >= col[1:]).all()), col
    # balanced factorisation: ‖β[:, j]‖ = ‖θ'_j‖ = √s_j
    torch.testing.assert_close(col, s.sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(row, s.sqrt(), rtol=1e-10, atol=0)
    # columns of β are orthogonal (left singular vectors scaled by √s)
    gram = block.beta_2d().T @ block.beta_2d()
    torch.testing.assert_close(gram, torch.diag(s), rtol=0, atol=1e-10 * s.max().item())


def test_svd_truncated_rank_is_best_approximation():
    conv = _conv(6, 10, 3, 1, 1, 1, False, seed=5)
    w = conv.weight.detach().reshape(10, -1)
    block = CompressedAwareConv2d.from_conv(conv, init="svd", rank=4)
    assert block.rank == 4
    s = torch.linalg.svdvals(w)
    err = torch.linalg.matrix_norm(block.effective_weight().reshape(10, -1) - w)
    torch.testing.assert_close(err, s[4:].norm(), rtol=1e-10, atol=0)   # Eckart–Young
    with pytest.raises(ValueError):
        CompressedAwareConv2d.from_conv(conv, rank=11)


def test_svd_of_rank_deficient_conv_is_exact():
    conv = _conv(4, 8, 1, 1, 0, 1, True, seed=2)
    with torch.no_grad():
        conv.weight[5:] = 0          # rank ≤ 4 anyway; zero filters and duplicated ones
        conv.weight[3] = conv.weight[0]
    block = CompressedAwareConv2d.from_conv(conv)
    assert block.rank == 4
    assert torch.isfinite(block.basis.weight).all() and torch.isfinite(block.coeff.weight).all()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(block(x), conv(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", [s for s in CONVS if s[1] <= s[0] * _kk(s[2])], ids=lambda s: str(s[:3]))
def test_identity_init_copies_theta_and_sets_beta_to_identity(spec):
    conv = _conv(*spec, seed=1)
    block = CompressedAwareConv2d.from_conv(conv, init="identity")
    assert torch.equal(block.basis.weight, conv.weight)
    c_out = conv.out_channels
    assert torch.equal(block.coeff.weight.view(c_out, c_out), torch.eye(c_out, dtype=torch.float64))
    if conv.bias is not None:
        assert torch.equal(block.coeff.bias, conv.bias)


def test_identity_init_falls_back_to_svd_where_c_out_exceeds_cin_k2():
    conv = _conv(2, 24, 3, 1, 1, 1, False)
    block = CompressedAwareConv2d.from_conv(conv, init="identity")
    assert block.rank == 18
    col = block.beta_2d().norm(dim=0)
    assert bool((col[:-1] >= col[1:]).all())
    torch.testing.assert_close(block.effective_weight(), conv.weight, rtol=0, atol=1e-12)


def _grads(block, x):
    x = x.clone().requires_grad_(True)
    out = block(x)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    block.zero_grad(set_to_none=True)
    (out * g).sum().backward()
    grads = [x.grad] + [p.grad for p in block.parameters()]
    return out.detach(), grads


@pytest.mark.parametrize("spec", CONVS[:4], ids=lambda s: str(s[:3]))
@pytest.mark.parametrize("rank", [None, 2])
def test_forward_modes_give_identical_outputs_and_gradients(spec, rank):
    conv = _conv(*spec, seed=4)
    block = CompressedAwareConv2d.from_conv(conv, rank=rank)
    x = torch.randn(2, spec[0], 9, 10, dtype=torch.float64)
    results = {}
    for mode in ("two_conv", "effective", "auto"):
        block.forward_mode = mode
        results[mode] = _grads(block, x)
    ref_out, ref_grads = results["two_conv"]
    assert len(ref_grads) == 1 + len(list(block.parameters()))
    for mode in ("effective", "auto"):
        out, grads = results[mode]
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
        assert len(grads) == len(ref_grads)
        for g, rg in zip(grads, ref_grads):
            assert g is not None and rg is not None
            torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-12)


def _used_two_conv(block, x) -> bool:
    calls = []
    h = block.basis.register_forward_hook(lambda *a: calls.append(1))
    try:
        block(x)
    finally:
        h.remove()
    return bool(calls)


def test_auto_mode_picks_the_cheaper_computation():
    conv = _conv(4, 8, 3, 1, 1, 1, False)
    # full rank r = 8: per output position the two convs cost r·(c_in·k² + c_out) = 352 MACs, the effective conv
    # c_out·c_in·k² = 288, plus the W = β·θ' product (2304 MACs) once per call; chosen with wide margins so that
    # counting the backward passes too (trainable weights) gives the same decisions
    block = CompressedAwareConv2d.from_conv(conv)
    block.forward_mode = "auto"
    big = torch.randn(1, 4, 32, 32, dtype=torch.float64)      # 1024 positions: effective is cheaper
    tiny = torch.randn(1, 4, 1, 1, dtype=torch.float64)       # 1 position: the product dominates
    assert not _used_two_conv(block, big)
    assert _used_two_conv(block, tiny)
    low = CompressedAwareConv2d.from_conv(conv, rank=2)       # 2·44 = 88 < 288 per position
    low.forward_mode = "auto"
    assert _used_two_conv(low, big)
    low.forward_mode = "effective"
    assert not _used_two_conv(low, tiny)
    low.forward_mode = "two_conv"
    assert _used_two_conv(low, big)


def test_merge_cost_ratio_is_eq14():
    conv = _conv(6, 10, 3, 1, 1, 1, False)
    block = CompressedAwareConv2d.from_conv(conv, rank=5)
    assert block.merge_cost_ratio() == pytest.approx((6 * 10 * 9) / (5 * (6 * 9 + 10)))


@pytest.mark.parametrize("bad", [
    nn.Conv2d(4, 8, 3, groups=2),
    nn.Conv2d(4, 4, 3, groups=4),
    nn.Linear(4, 8),
    nn.Conv1d(4, 8, 3),
    nn.BatchNorm2d(4),
])
def test_from_conv_rejects_unsupported_modules(bad):
    with pytest.raises(TypeError):
        CompressedAwareConv2d.from_conv(bad)


def test_from_conv_rejects_bad_init():
    with pytest.raises(ValueError):
        CompressedAwareConv2d.from_conv(nn.Conv2d(2, 2, 1), init="random")
