"""Surgery primitives: slicing convs / norms / optimizer state, the β·θ' merge and the named low-rank pair."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from edp_det.ops.surgery import (LowRankConv2d, is_lowrank_pair, kept_indices, merged_conv, merged_weight,
                                 remap_optimizer, select, slice_conv, slice_norm, slice_param_state)


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 5, 3, stride=2, padding=1)).to(dtype)
    bn = net[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return net


@pytest.mark.parametrize("train", [False, True])
def test_sliced_conv_norm_consumer_equals_masking(train):
    net = _net()
    keep = torch.tensor([0, 2, 3, 6])
    drop = torch.ones(8, dtype=torch.bool)
    drop[keep] = False
    masked = _net()
    with torch.no_grad():                       # the consumer ignores the dropped channels
        masked[3].weight[:, drop] = 0
    sliced = nn.Sequential(slice_conv(net[0], out_idx=keep), slice_norm(net[1], keep), nn.ReLU(),
                           slice_conv(net[3], in_idx=keep))
    assert sliced[0].weight.shape == (4, 3, 3, 3) and sliced[3].weight.shape == (5, 4, 3, 3)
    assert sliced[3].stride == (2, 2) and sliced[3].padding == (1, 1) and sliced[0].weight.dtype == torch.float64
    assert torch.equal(sliced[1].running_var, net[1].running_var[keep])
    masked.train(train)
    sliced.train(train)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(sliced(x), masked(x), rtol=1e-12, atol=1e-12)
    # a bool mask selects the same channels
    mask = ~drop
    assert torch.equal(slice_norm(net[1], mask).weight, slice_norm(net[1], keep).weight)


def test_slice_keeps_flags_and_rejects_other_norms():
    net = _net(torch.float32)
    net[0].requires_grad_(False)
    c = slice_conv(net[0], out_idx=torch.tensor([1]))
    assert not c.weight.requires_grad and not c.bias.requires_grad
    assert slice_conv(net[0], out_idx=torch.tensor([1]), requires_grad=True).weight.requires_grad
    net[1].eval()
    assert not slice_norm(net[1], torch.tensor([0, 1])).training
    with pytest.raises(TypeError, match="layer 'gn' of type GroupNorm"):
        slice_norm(nn.GroupNorm(2, 8), torch.tensor([0, 1]), name="gn")
    assert torch.equal(kept_indices(torch.tensor([False, True, True])), torch.tensor([1, 2]))
    assert torch.equal(kept_indices(torch.zeros(3, dtype=torch.bool)), torch.tensor([0]))   # never empty


def test_merge_exact_and_pair_keys():
    torch.manual_seed(1)
    basis = nn.Conv2d(6, 3, 3, stride=2, padding=1, dilation=1, bias=False).double()
    coeff = nn.Conv2d(3, 7, 1, bias=True).double()
    pair = LowRankConv2d(basis, coeff)
    assert is_lowrank_pair(pair) and (pair.in_channels, pair.rank, pair.out_channels) == (6, 3, 7)
    # state-dict keys are those of the former Sequential(basis, coeff), so old files load
    seq = nn.Sequential(OrderedDict([("basis", basis), ("coeff", coeff)]))
    assert list(pair.state_dict()) == list(seq.state_dict()) == ["basis.weight", "coeff.weight", "coeff.bias"]
    merged = merged_conv(basis.weight, coeff.weight, coeff.bias, basis)
    assert merged.weight.shape == (7, 6, 3, 3) and merged.stride == (2, 2) and merged.padding == (1, 1)
    x = torch.randn(2, 6, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(merged(x), pair(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pair(x), seq(x), rtol=0, atol=0)
    # float32: the product is formed in float64 and cast once
    b32, t32 = coeff.weight.float(), basis.weight.float()
    ref = (b32.reshape(7, 3).double() @ t32.reshape(3, -1).double()).view(7, 6, 3, 3).float()
    assert torch.equal(merged_weight(t32, b32), ref)
    sub = select(basis.weight, torch.tensor([0, 2]), torch.tensor([1, 4, 5]))
    assert torch.equal(sub, basis.weight[[0, 2]][:, [1, 4, 5]])


def _step_pair(opt_cls, **kw):
    """A full parameter and its slice: after ``remap_optimizer`` the sliced optimizer must take the same steps
    on the kept entries as the full one (both optimizers are element-wise)."""
    torch.manual_seed(2)
    full = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = opt_cls([full], **kw)
    grads = [torch.randn(6, 4, dtype=torch.float64) for _ in range(5)]
    for g in grads[:3]:
        full.grad = g.clone()
        opt.step()
    idx = [torch.tensor([0, 3, 5]), torch.tensor([1, 2])]
    twin = nn.Parameter(full.detach().clone())
    opt_twin = opt_cls([twin], **kw)
    opt_twin.load_state_dict(opt.state_dict())
    new = nn.Parameter(full.detach()[idx[0]][:, idx[1]].clone())
    old_state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt_twin.state[twin].items()}
    remap_optimizer(opt_twin, {id(twin): (new, idx)})
    assert opt_twin.param_groups[0]["params"][0] is new and twin not in opt_twin.state
    for k, v in old_state.items():
        got = opt_twin.state[new][k]
        if torch.is_tensor(v) and v.dim() > 0:
            assert torch.equal(got, v[idx[0]][:, idx[1]]), k
        else:
            assert got == v, k
    for g in grads[3:]:
        full.grad = g.clone()
        opt.step()
        new.grad = g[idx[0]][:, idx[1]].clone()
        opt_twin.step()
    assert torch.equal(new.detach(), full.detach()[idx[0]][:, idx[1]])
    return old_state


def test_optimizer_state_sgd_momentum():
    st = _step_pair(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert "momentum_buffer" in st


def test_optimizer_state_adam_moments():
    st = _step_pair(torch.optim.Adam, lr=0.01)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(st)


def test_slice_param_state_leaves_other_entries():
    st = {"momentum_buffer": torch.arange(6.).view(3, 2), "step": torch.tensor(4.), "flag": True}
    out = slice_param_state(st, torch.Size([3, 2]), [torch.tensor([2]), None])
    assert torch.equal(out["momentum_buffer"], torch.tensor([[4., 5.]]))
    assert out["step"] == 4 and out["flag"] is True
    assert out["momentum_buffer"].data_ptr() != st["momentum_buffer"].data_ptr()
