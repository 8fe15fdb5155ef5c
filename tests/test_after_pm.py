"""After prune_and_merge: carry_optimizer gives the same optimizer over the pruned model with its state carried,
a pre-PM optimizer or regulariser used on the pruned model warns once, the public API exposes the helpers."""
from __future__ import annotations

import logging

import pytest
import torch

import edp_det

from _core_helpers import cached, one_thread, sparsify  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_step(model, opt, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


@pytest.fixture
def pruned():
    _, model = cached("resnet18", num_classes=10)
    model.train()
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9, nesterov=True)
    reg = edp_det.EDPRegularizer(model, 1e-3, 1e-3, optimizer=opt)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _trained_step(model, opt, x)
    sparsify(model, seed=5)
    n_before = sum(1 for _ in model.parameters())
    report = edp_det.prune_and_merge(model, input_size=(3, 32, 32))
    return model, opt, reg, report, x, n_before


def test_carry_optimizer_covers_the_pruned_model_with_same_hyper_parameters(pruned):
    model, opt, _, report, x, n_before = pruned
    in_model = {id(p) for p in model.parameters()}
    old_in_model = sum(id(p) in in_model for g in opt.param_groups for p in g["params"])
    assert old_in_model < sum(1 for _ in model.parameters())   # the old optimizer misses the replaced parameters
    new = edp_det.carry_optimizer(opt, model, report)
    assert type(new) is torch.optim.SGD
    assert {id(p) for g in new.param_groups for p in g["params"]} == in_model
    assert [(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) for g in new.param_groups] == \
        [(0.01, 0.9, True, 1e-4), (0.01, 0.9, True, 0.0)]
    assert all(n.endswith("bias") for n, p in model.named_parameters() if any(p is q for q in new.param_groups[1]["params"]))
    # momentum carried for parameters that survived (sliced or unchanged), sliced to their new shapes
    carried = [p for p in model.parameters() if "momentum_buffer" in new.state.get(p, {})]
    assert len(carried) > old_in_model
    for p in carried:
        assert new.state[p]["momentum_buffer"].shape == p.shape
    _trained_step(model, new, x)   # trains every parameter
    assert edp_det.transfer_optimizer_state is edp_det.edp.pruning.transfer_optimizer_state
    assert edp_det.recalibrate_batchnorm is edp_det.edp.calibration.recalibrate_batchnorm


def test_stale_optimizer_and_regulariser_warn_once(pruned, caplog):
    model, opt, reg, report, x, _ = pruned
    with caplog.at_level(logging.WARNING):
        _trained_step(model, opt, x)
        _trained_step(model, opt, x)
        reg.prox_step(0.01)
        reg.prox_step(0.01)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    opt_msgs = [m for m in msgs if "created before prune_and_merge" in m and "carry_optimizer" in m]
    reg_msgs = [m for m in msgs if m.startswith("EDPRegularizer") and "no longer in the model" in m]
    assert len(opt_msgs) == 1 and len(reg_msgs) == 1, msgs
    caplog.clear()
    new = edp_det.carry_optimizer(opt, model, report)
    with caplog.at_level(logging.WARNING):
        _trained_step(model, new, x)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_fresh_regulariser_and_optimizer_do_not_warn(caplog):
    _, model = cached("resnet18", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reg = edp_det.EDPRegularizer(model, 1e-3, 1e-3, optimizer=opt)
    with caplog.at_level(logging.WARNING):
        _trained_step(model, opt, torch.randn(2, 3, 32, 32, dtype=torch.float64))
        reg.prox_step(0.01)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
