"""EDPRegularizer: the proximal operator against a hand-computed group soft-thresholding, row groups that own the
bias and the following BatchNorm affine parameters, Ω, λ validation, momentum handling and stats()."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from edp_det import CompressedAwareConv2d, EDPRegularizer, iter_blocks

from _core_helpers import cached, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# A hand-made 3×2 β (c_out = 3, r = 2) whose groups exercise every branch of eq. (12)/(13).
#   columns (t1 = lr·λ1 = 0.625):  col 0 = (3, 0.25, 0) → shrunk;  col 1 = (0.375, 0, 0.5): ‖·‖ = 0.625 exactly
#                                   = t1 → exactly zero ("otherwise" branch of eq. 12)
#   rows (t2 = lr·λ2 = 0.875), each row group = β row ∪ {bias, γ, b of the BN}:
#       row 0: large → shrunk
#       row 1: β(1,0)·s = 0.25·s, bias 0.125, γ 0.0625, b 0.25  → norm < t2 → zero
#       row 2: β row becomes (0, 0) after the column step; bias 0.25, γ 0.375, b 0.75 → norm = 0.875 exactly = t2
BETA = [[3.0, 0.375], [0.25, 0.0], [0.0, 0.5]]
BIAS = [0.5, 0.125, 0.25]
GAMMA = [1.5, 0.0625, 0.375]
BN_B = [-0.75, 0.25, 0.75]
LAM_RANK, LAM_CH, LR = 0.3125, 0.4375, 2.0      # t1 = 0.625, t2 = 0.875 (all dyadic: exact in binary)


def _toy(prunable=True, with_bn=True, bias=True):
    block = CompressedAwareConv2d(4, 3, 2, 1, bias=bias, channel_prunable=prunable).double()
    with torch.no_grad():
        block.coeff.weight.copy_(torch.tensor(BETA, dtype=torch.float64).view(3, 2, 1, 1))
        block.basis.weight.copy_(torch.randn(2, 4, 1, 1, dtype=torch.float64,
                                             generator=torch.Generator().manual_seed(0)))
        if bias:
            block.coeff.bias.copy_(torch.tensor(BIAS, dtype=torch.float64))
    mods = OrderedDict(conv=block)
    if with_bn:
        bn = nn.BatchNorm2d(3).double()
        with torch.no_grad():
            bn.weight.copy_(torch.tensor(GAMMA, dtype=torch.float64))
            bn.bias.copy_(torch.tensor(BN_B, dtype=torch.float64))
            bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
            bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64))
        mods["bn"] = bn
        block.norm_name = "bn"
    return nn.Sequential(mods)


def _expected_prox(beta, bias, gamma, bn_b, t1, t2, rows=True):
    """Eq. (12) on the columns, then eq. (13) on the row groups (β row ∪ bias ∪ γ ∪ b), in plain Python."""
    beta = [row[:] for row in beta]
    n_out, r = len(beta), len(beta[0])
    for j in range(r):
        norm = math.sqrt(sum(beta[i][j] ** 2 for i in range(n_out)))
        scale = 1 - t1 / norm if norm > t1 else 0.0
        for i in range(n_out):
            beta[i][j] *= scale
    bias, gamma, bn_b = bias[:], gamma[:], bn_b[:]
    if rows:
        for i in range(n_out):
            norm = math.sqrt(sum(v ** 2 for v in beta[i]) + bias[i] ** 2 + gamma[i] ** 2 + bn_b[i] ** 2)
            scale = 1 - t2 / norm if norm > t2 else 0.0
            beta[i] = [v * scale for v in beta[i]]
            bias[i] *= scale
            gamma[i] *= scale
            bn_b[i] *= scale
    return beta, bias, gamma, bn_b


def test_prox_matches_closed_form_group_soft_thresholding():
    model = _toy()
    reg = EDPRegularizer(model, lambda_rank=LAM_RANK, lambda_channel=LAM_CH)
    rm, rv = model.bn.running_mean.clone(), model.bn.running_var.clone()
    basis = model.conv.basis.weight.clone()
    reg.prox_step(LR)
    t1, t2 = LR * LAM_RANK, LR * LAM_CH
    assert (t1, t2) == (0.625, 0.875)
    e_beta, e_bias, e_gamma, e_b = _expected_prox(BETA, BIAS, GAMMA, BN_B, t1, t2)
    beta = model.conv.beta_2d()
    torch.testing.assert_close(beta, torch.tensor(e_beta, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(model.conv.coeff.bias, torch.tensor(e_bias, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(model.bn.weight, torch.tensor(e_gamma, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(model.bn.bias, torch.tensor(e_b, dtype=torch.float64), rtol=1e-14, atol=0)
    # the branches the data was built for, checked directly
    assert torch.equal(beta[:, 1], torch.zeros(3, dtype=torch.float64))          # column exactly at threshold
    for i in (1, 2):                                                              # below / exactly at threshold
        assert beta[i].abs().max() == 0 and model.conv.coeff.bias[i] == 0
        assert model.bn.weight[i] == 0 and model.bn.bias[i] == 0
    assert beta[0, 0] != 0 and 0 < model.bn.weight[0] < GAMMA[0]
    # θ' and the running statistics are not part of any group
    assert torch.equal(model.conv.basis.weight, basis)
    assert torch.equal(model.bn.running_mean, rm) and torch.equal(model.bn.running_var, rv)


def test_prox_columns_only_on_blocks_that_are_not_channel_prunable():
    model = _toy(prunable=False)
    reg = EDPRegularizer(model, lambda_rank=LAM_RANK, lambda_channel=LAM_CH)
    assert reg.entries[0].lam_row == 0
    reg.prox_step(LR)
    e_beta, *_ = _expected_prox(BETA, BIAS, GAMMA, BN_B, 0.625, 0.875, rows=False)
    torch.testing.assert_close(model.conv.beta_2d(), torch.tensor(e_beta, dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.equal(model.conv.coeff.bias, torch.tensor(BIAS, dtype=torch.float64))
    assert torch.equal(model.bn.weight, torch.tensor(GAMMA, dtype=torch.float64))


def test_zeroed_row_group_outputs_exact_zero_in_train_and_eval():
    model = _toy()
    EDPRegularizer(model, lambda_rank=LAM_RANK, lambda_channel=LAM_CH).prox_step(LR)
    x = torch.randn(4, 4, 6, 7, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        y = model(x)
        assert torch.equal(y[:, 1:], torch.zeros_like(y[:, 1:])), train
        assert y[:, 0].abs().max() > 0
    # without BN: the bias belongs to the group, so the block output itself is exactly 0 on those channels
    plain = _toy(with_bn=False)
    EDPRegularizer(plain, lambda_rank=0.0, lambda_channel=2.0).prox_step(1.0)
    y = plain(x)
    norms = [math.sqrt(sum(v ** 2 for v in row) + b ** 2) for row, b in zip(BETA, BIAS)]
    for i, n in enumerate(norms):
        assert bool((y[:, i] == 0).all()) == (n <= 2.0)


def test_penalty_matches_hand_computation_and_is_differentiable():
    prunable = _toy()
    other = _toy(prunable=False, with_bn=False, bias=False)
    model = nn.Sequential(OrderedDict(a=prunable, b=other))
    model.a.conv.norm_name = "a.bn"
    reg = EDPRegularizer(model, lambda_rank=LAM_RANK, lambda_channel=LAM_CH)
    assert [e.name for e in reg.entries] == ["a.conv", "b.conv"]
    cols = sum(math.sqrt(sum(BETA[i][j] ** 2 for i in range(3))) for j in range(2))
    rows = sum(math.sqrt(sum(v ** 2 for v in BETA[i]) + BIAS[i] ** 2 + GAMMA[i] ** 2 + BN_B[i] ** 2)
               for i in range(3))
    expected = LAM_RANK * cols + LAM_CH * rows + LAM_RANK * cols     # block b: columns only
    omega = reg.penalty()
    assert omega.dim() == 0
    assert omega.item() == pytest.approx(expected, rel=1e-14)
    omega.backward()
    beta = torch.tensor(BETA, dtype=torch.float64)
    col_n = beta.norm(dim=0)
    row_n = torch.tensor([math.sqrt(sum(v ** 2 for v in BETA[i]) + BIAS[i] ** 2 + GAMMA[i] ** 2 + BN_B[i] ** 2)
                          for i in range(3)], dtype=torch.float64)
    g = LAM_RANK * beta / col_n + LAM_CH * beta / row_n[:, None]
    torch.testing.assert_close(model.a.conv.coeff.weight.grad.view(3, 2), g, rtol=1e-12, atol=0)
    torch.testing.assert_close(model.a.bn.weight.grad, LAM_CH * torch.tensor(GAMMA, dtype=torch.float64) / row_n,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(model.b.conv.coeff.weight.grad.view(3, 2), LAM_RANK * beta / col_n, rtol=1e-12, atol=0)


def test_lambda_zero_and_frozen_layers_are_bit_identical():
    _, model = cached("resnet18", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reg = EDPRegularizer(model, lambda_rank=0.0, lambda_channel=0.0)
    reg.prox_step(10.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert reg.penalty().item() == 0.0
    # a frozen block is left alone even with huge λ; trainable ones are shrunk
    model.layer1[0].conv1.requires_grad_(False)
    reg = EDPRegularizer(model, lambda_rank=1e3, lambda_channel=1e3)
    assert "layer1.0.conv1" not in {e.name for e in reg.entries}
    reg.prox_step(1.0)
    sd = model.state_dict()
    for k in ("layer1.0.conv1.coeff.weight", "layer1.0.conv1.basis.weight", "layer1.0.bn1.weight"):
        assert torch.equal(before[k], sd[k]), k
    assert sd["layer1.0.conv2.coeff.weight"].abs().max() == 0
    assert sd["layer1.1.bn1.weight"].abs().max() == 0        # row groups of prunable layer1.1.conv1 died


def test_lambda_channel_zero_leaves_rows_alone():
    model = _toy()
    EDPRegularizer(model, lambda_rank=LAM_RANK, lambda_channel=0.0).prox_step(LR)
    e_beta, *_ = _expected_prox(BETA, BIAS, GAMMA, BN_B, 0.625, 0.875, rows=False)
    torch.testing.assert_close(model.conv.beta_2d(), torch.tensor(e_beta, dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.equal(model.bn.weight, torch.tensor(GAMMA, dtype=torch.float64))
    assert torch.equal(model.conv.coeff.bias, torch.tensor(BIAS, dtype=torch.float64))


@pytest.mark.parametrize("key", ["lambda_rank", "lambda_channel"])
@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf"), "0.1", None, True])
def test_bad_lambda_raises(key, value):
    with pytest.raises(ValueError, match=key):
        EDPRegularizer(_toy(), **{key: value})


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf")])
def test_bad_lr_raises(lr):
    model = _toy()
    before = model.conv.coeff.weight.clone()
    with pytest.raises(ValueError):
        EDPRegularizer(model, lambda_rank=LAM_RANK, lambda_channel=LAM_CH).prox_step(lr)
    assert torch.equal(model.conv.coeff.weight, before)


def test_undecomposed_model_raises():
    with pytest.raises(ValueError, match="decompose"):
        EDPRegularizer(nn.Sequential(nn.Conv2d(3, 4, 3)))


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_momentum_of_zeroed_groups_is_zeroed(opt_name):
    model = _toy()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)   # lr 0: buffers filled, β kept exact
        key = "momentum_buffer"
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.0)
        key = "exp_avg"
    model.eval()   # running stats: the gradient reaches the bias too (train-mode BN cancels a constant shift)
    model(torch.randn(4, 4, 5, 5, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    st = opt.state
    w, b, g, bb = model.conv.coeff.weight, model.conv.coeff.bias, model.bn.weight, model.bn.bias
    assert all(st[p][key].abs().min() > 0 for p in (w, b, g, bb))     # a real step: all buffers non-zero
    basis_buf = st[model.conv.basis.weight][key].clone()
    before = {p: st[p][key].clone() for p in (w, b, g, bb)}
    EDPRegularizer(model, lambda_rank=LAM_RANK, lambda_channel=LAM_CH, optimizer=opt).prox_step(LR)
    beta = model.conv.beta_2d()
    dead_col = (beta == 0).all(dim=0)
    dead_row = (beta == 0).all(dim=1) & (b == 0) & (g == 0) & (bb == 0)
    assert dead_col.tolist() == [False, True] and dead_row.tolist() == [False, True, True]
    wbuf = st[w][key].view(3, 2)
    assert torch.equal(wbuf[:, 1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(wbuf[1:], torch.zeros(2, 2, dtype=torch.float64))
    assert wbuf[0, 0] == before[w].view(3, 2)[0, 0]                          # live entry untouched
    for p in (b, g, bb):
        assert torch.equal(st[p][key][1:], torch.zeros(2, dtype=torch.float64))
        assert st[p][key][0] == before[p][0]
    assert torch.equal(st[model.conv.basis.weight][key], basis_buf)
    # without an optimizer the buffers are not touched
    model2 = _toy()
    opt2 = torch.optim.SGD(model2.parameters(), lr=1e-3, momentum=0.9)
    model2.eval()
    model2(torch.randn(4, 4, 5, 5, dtype=torch.float64)).pow(2).sum().backward()
    opt2.step()
    buf = opt2.state[model2.conv.coeff.weight]["momentum_buffer"].clone()
    EDPRegularizer(model2, lambda_rank=LAM_RANK, lambda_channel=LAM_CH).prox_step(LR)
    assert torch.equal(opt2.state[model2.conv.coeff.weight]["momentum_buffer"], buf)


def test_stats_live_counts():
    model = _toy()
    reg = EDPRegularizer(model, lambda_rank=LAM_RANK, lambda_channel=LAM_CH)
    (s,) = reg.stats()
    assert (s.name, s.in_channels, s.rank, s.out_channels) == ("conv", 4, 2, 3)
    assert (s.live_rank, s.live_channels, s.channel_prunable) == (2, 3, True)
    reg.prox_step(LR)
    (s,) = reg.stats()
    assert (s.live_rank, s.live_channels) == (1, 1)
    # live: reflects direct edits; a row is live while any of its group (β row, bias, γ, b) is non-zero
    with torch.no_grad():
        model.bn.bias[2] = 0.5
    assert reg.stats()[0].live_channels == 2
    with torch.no_grad():
        model.conv.beta_2d()[:, 0] = 0
    s = reg.stats()[0]
    assert s.live_rank == 0 and s.live_channels == 2
    # not channel-prunable: all channels reported live
    other = _toy(prunable=False)
    reg2 = EDPRegularizer(other, lambda_rank=LAM_RANK, lambda_channel=LAM_CH)
    reg2.prox_step(LR)
    assert reg2.stats()[0].live_channels == 3 and reg2.stats()[0].live_rank == 1


def test_stats_on_resnet_after_strong_prox():
    _, model = cached("resnet18", num_classes=10)
    reg = EDPRegularizer(model, lambda_rank=0.0, lambda_channel=1.0)
    names = [n for n, _ in iter_blocks(model)]
    assert [e.name for e in reg.entries] == names
    # threshold between the smallest and the largest row-group norm of layer2.0.conv1
    b = model.layer2[0].conv1
    bn = model.layer2[0].bn1
    norms = (b.beta_2d().pow(2).sum(1) + bn.weight.pow(2) + bn.bias.pow(2)).sqrt().detach()
    t = float(norms.median())
    reg.prox_step(t)    # λ2 = 1, lr = t
    stats = {s.name: s for s in reg.stats()}
    assert stats["layer2.0.conv1"].live_channels == int((norms > t).sum())
    assert stats["layer2.0.conv1"].live_rank == b.rank
    assert stats["layer2.0.conv2"].live_channels == 128 and not stats["layer2.0.conv2"].channel_prunable
    dead = norms <= t
    assert torch.equal(bn.weight[dead], torch.zeros(int(dead.sum()), dtype=torch.float64))


def test_prox_guard_sees_the_groups_a_step_would_zero_and_can_refuse_it():
    """``prox_step(lr, guard)``: the guard is asked before anything is written, with the masks of the groups that
    would be zero after the step; refusing leaves every tensor (and the momentum) untouched, accepting gives the
    same result as a step without a guard; a step that zeroes nothing new does not ask."""
    calls = []

    def refuse(zero):
        calls.append({k: tuple(None if m is None else m.tolist() for m in v) for k, v in zero.items()})
        return False

    model = _toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    model(torch.randn(2, 4, 5, 5, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    reg = EDPRegularizer(model, lambda_rank=LAM_RANK, lambda_channel=LAM_CH, optimizer=opt)
    assert reg.prox_step(LR, guard=refuse) is False
    assert calls == [{"conv": ([False, True], [False, True, True])}]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and torch.equal(opt.state[p]["momentum_buffer"], bufs[n]), n
    assert reg.prox_step(LR, guard=lambda zero: True) is True
    plain = _toy()
    EDPRegularizer(plain, lambda_rank=LAM_RANK, lambda_channel=LAM_CH).prox_step(LR)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n
    calls.clear()
    assert reg.prox_step(1e-6, guard=refuse) is True and calls == []     # zeroes nothing new: no question
