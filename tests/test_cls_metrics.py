"""Top-k accuracy on hand-made logits, including ties (broken towards the smaller class index)."""
import math

import pytest
import torch

from edp_det.evaluation.classification import AccuracyMeter, topk_accuracy, topk_correct

LOGITS = torch.tensor(
    [
        [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],  # target 3: best -> rank 0 (top1, top5)
        [0.5, 0.5, 0.1, 0.0, 0.0, 0.0],  # target 1: tied with class 0, which comes first -> rank 1 (top5 only)
        [0.5, 0.5, 0.1, 0.0, 0.0, 0.0],  # target 0: wins the tie -> rank 0 (top1, top5)
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # target 0: worst -> rank 5 (neither)
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # target 5: all tied -> rank 5 (neither); target order decides
    ],
    dtype=torch.float64,
)
TARGETS = torch.tensor([3, 1, 0, 0, 5])


def test_topk_hand_computed():
    # top1: rows 0, 2 -> 2/5; top5: rows 0, 1, 2 -> 3/5; top2: rows 0, 1, 2 -> 3/5; top6 (= C): all -> 1.
    assert topk_correct(LOGITS, TARGETS, ks=(1, 2, 5, 6)) == {1: 2, 2: 3, 5: 3, 6: 5}
    acc = topk_accuracy(LOGITS, TARGETS)
    assert acc == {"top1": pytest.approx(2 / 5), "top5": pytest.approx(3 / 5)}


def test_ties_deterministic_and_permutation_consistent():
    a = topk_accuracy(LOGITS, TARGETS, ks=(1, 2, 3))
    for _ in range(3):
        assert topk_accuracy(LOGITS.clone(), TARGETS.clone(), ks=(1, 2, 3)) == a
    # row 4 (all tied, target 5) -> rank 5; target 0 on the same row -> rank 0
    assert topk_accuracy(LOGITS[4:], torch.tensor([0]), ks=(1,)) == {"top1": 1.0}
    assert topk_accuracy(LOGITS[4:], torch.tensor([5]), ks=(5,)) == {"top5": 0.0}


def test_no_ties_agrees_with_torch_topk():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g)
    targets = torch.randint(0, 10, (64,), generator=g)
    top = logits.topk(5, dim=1).indices
    exp1 = (top[:, :1] == targets[:, None]).any(1).float().mean().item()
    exp5 = (top == targets[:, None]).any(1).float().mean().item()
    acc = topk_accuracy(logits, targets)
    assert acc["top1"] == pytest.approx(exp1) and acc["top5"] == pytest.approx(exp5)


def test_k_clipped_to_num_classes():
    logits = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    # C = 3 < 5 -> top5 == top3 == 1.0; top1: row 0 target 2 (best) yes, row 1 target 2 (worst) no
    assert topk_accuracy(logits, torch.tensor([2, 2])) == {"top1": 0.5, "top5": 1.0}


def test_meter_streaming_equals_one_shot():
    m = AccuracyMeter(ks=(1, 5))
    m.update(LOGITS[:2], TARGETS[:2])
    m.update(LOGITS[2:], TARGETS[2:])
    assert m.n == 5 and m.compute() == topk_accuracy(LOGITS, TARGETS)
    st = m.state()
    m2 = AccuracyMeter(ks=(1, 5))
    m2.load_state(st)
    assert m2.compute() == m.compute()
    m.reset()
    assert m.n == 0 and all(math.isnan(v) for v in m.compute().values())


def test_bad_inputs():
    with pytest.raises(ValueError, match="logits"):
        topk_accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        topk_accuracy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        topk_accuracy(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="k >= 1|>= 1"):
        topk_accuracy(torch.zeros(2, 4), torch.tensor([0, 1]), ks=(0,))
    assert math.isnan(topk_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))["top1"])
