"""compact_zero_groups: exact removal of already-zero groups during the regularised phase; training continues."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50

from edp_det import EDPRegularizer, count_flops, decompose, iter_blocks, prune_and_merge
from edp_det.ops.block import CompressedAwareConv2d
from edp_det.edp.compaction import compact_zero_groups
from edp_det.edp.pruning import transfer_optimizer_state

from _core_helpers import one_thread  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch=resnet18, seed=0):
    torch.manual_seed(seed)
    m = arch(num_classes=5).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.2)
                mod.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.2)
    return decompose(m)


@torch.no_grad()
def _zero_groups(model, seed=0, col_frac=0.5, row_frac=0.25):
    """Zero random β columns of every block and whole row groups (β row, bias, BN γ and b) of prunable blocks."""
    g = torch.Generator().manual_seed(seed)
    expect = {}
    for name, b in iter_blocks(model):
        cols = torch.randperm(b.rank, generator=g)[: int(b.rank * col_frac)]
        b.beta_2d()[:, cols] = 0
        rows = torch.tensor([], dtype=torch.long)
        if b.channel_prunable:
            rows = torch.randperm(b.out_channels, generator=g)[: int(b.out_channels * row_frac)]
            b.beta_2d()[rows] = 0
            if b.coeff.bias is not None:
                b.coeff.bias[rows] = 0
            norm = model.get_submodule(b.norm_name)
            norm.weight[rows] = 0
            norm.bias[rows] = 0
        expect[name] = (b.rank - len(cols), b.out_channels - len(rows))
    return expect


def _rel(a, b):
    return float((a.detach() - b.detach()).abs().max() / a.detach().abs().max())


def test_compaction_is_exact_in_train_and_eval_mode_and_shrinks_blocks():
    model = _model()
    expect = _zero_groups(model)
    ref = copy.deepcopy(model)
    report = compact_zero_groups(model)
    assert report.changed and report.params_after < report.params_before
    for name, b in iter_blocks(model):
        assert isinstance(b, CompressedAwareConv2d)
        r, co = expect[name]
        assert b.rank <= r and b.out_channels == co
        old = ref.get_submodule(name)
        assert (b.orig_in_channels, b.orig_out_channels) == (old.orig_in_channels, old.orig_out_channels)
        assert b.channel_prunable == old.channel_prunable and b.norm_name == old.norm_name
        if b.norm_name:
            assert model.get_submodule(b.norm_name).num_features == b.out_channels
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(ref, mode)()
        assert _rel(ref(x), model(x)) < 1e-10
    # the compacted model keeps the original network as its FLOPs reference
    assert count_flops(model, input_size=(3, 32, 32)).original_flops_under("") == \
        count_flops(ref, input_size=(3, 32, 32)).original_flops_under("")


def test_gradients_of_surviving_entries_are_unchanged():
    model = _model()
    _zero_groups(model, seed=1)
    ref = copy.deepcopy(model)
    report = compact_zero_groups(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 3])
    for m in (model, ref):
        m.train()
        F.cross_entropy(m(x), y).backward()
    old = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if name in report.param_map:
            old_name, idx = report.param_map[name]
            g = old[old_name].grad
            for d, ix in enumerate(idx):
                g = g.index_select(d, ix)
        else:
            g = old[name].grad
        assert g.shape == p.grad.shape, name
        assert _rel(g, p.grad) < 1e-8, (name, _rel(g, p.grad))


def test_optimizer_and_regularizer_are_updated_in_place_and_training_continues():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    reg = EDPRegularizer(model, lambda_rank=1e-3, lambda_channel=1e-3, optimizer=opt)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 4])
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    reg.prox_step(0.01)
    opt.zero_grad()
    _zero_groups(model, seed=2)
    old_named = {n: p for n, p in model.named_parameters()}
    old_mom = {n: opt.state[p]["momentum_buffer"].clone() for n, p in old_named.items()}
    report = compact_zero_groups(model, optimizer=opt, regularizer=reg)
    assert report.changed
    params = list(model.parameters())
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(opt_params) and all(a is b for a, b in zip(params, opt_params))
    for name, p in model.named_parameters():
        buf = opt.state[p]["momentum_buffer"]
        expect = old_mom[report.param_map[name][0]] if name in report.param_map else old_mom[name]
        if name in report.param_map:
            for d, ix in enumerate(report.param_map[name][1]):
                expect = expect.index_select(d, ix)
        assert buf.shape == p.shape and torch.equal(buf, expect), name
    blocks = {id(b) for _, b in iter_blocks(model)}
    assert all(id(e.block) in blocks for e in reg.entries)
    for _ in range(2):   # training (step, prox, scheduler) continues on the smaller model
        F.cross_entropy(model(x), y).backward()
        opt.step()
        reg.prox_step(sched.get_last_lr()[0])
        opt.zero_grad()
        sched.step()
    assert torch.isfinite(model(x)).all()


def test_transfer_optimizer_state_without_in_place_update():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32, dtype=torch.float64)), torch.tensor([0, 1])).backward()
    opt.step()
    _zero_groups(model, seed=3)
    old_names = dict(model.named_parameters())
    report = compact_zero_groups(model)
    new_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    carried = transfer_optimizer_state(opt.state, old_names, model, new_opt, report)
    assert carried == len(list(model.parameters()))


def test_nothing_to_remove_is_a_no_op():
    model = _model()
    before = [id(p) for p in model.parameters()]
    report = compact_zero_groups(model)
    assert not report.changed and report.params_after == report.params_before
    assert before == [id(p) for p in model.parameters()]


def test_prune_and_merge_after_compaction_matches_prune_and_merge_without():
    model = _model(resnet50)
    _zero_groups(model, seed=4)
    ref = copy.deepcopy(model)
    compact_zero_groups(model)
    rep_a = prune_and_merge(model, input_size=(3, 32, 32))
    rep_b = prune_and_merge(ref, input_size=(3, 32, 32))
    assert rep_a.flops_after == rep_b.flops_after and rep_a.flops_original == rep_b.flops_original
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.eval()
    ref.eval()
    assert _rel(ref(x), model(x)) < 1e-10


def test_hooks_on_blocks_are_refused():
    model = _model()
    _zero_groups(model)
    name, b = next(iter(iter_blocks(model)))
    b.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="hooks"):
        compact_zero_groups(model)
