"""The FLOPs budget cuts layers in proportion: no layer is gutted to a 1-channel / rank-1 bottleneck at a moderate
target (the failure mode of scoring groups by norm per FLOP saved, which wrecked a detector after PM)."""
import copy

import pytest
import torch
import torchvision

import edp_det


def _removed_share(layer):
    """Fraction of a layer's rank and channel groups PM removed (a merged layer: channels only)."""
    _, r, c_out = layer.before
    _, r2, c_out2 = layer.after
    return (0.0 if layer.merged else 1 - r2 / r), 1 - c_out2 / c_out


def test_moderate_target_spreads_over_layers():
    """Without layer weights (the paper's per-layer ratio) every stage is cut; with the default estimated weights
    the last, slow-per-FLOP stage is cut hardest, but no layer loses more than SPREAD of its groups."""
    from edp_det.edp.budget import SPREAD

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    edp_det.decompose(m)
    plain = copy.deepcopy(m)
    rep = edp_det.prune_and_merge(plain, flops_target=0.4, input_size=(3, 64, 64), layer_weights=None)
    assert 0.40 <= rep.achieved_r_flops <= 0.41 and rep.budget == "norm"
    for layer in rep.layers:
        c_in, r, c_out = layer.before
        _, r2, c_out2 = layer.after
        assert c_out2 >= 0.25 * c_out, (layer.name, layer.before, layer.after)
        if not layer.merged:
            assert r2 >= 0.1 * r, (layer.name, layer.before, layer.after)
    # the cut reaches both early (high-resolution) and late layers
    changed = {l.name.split(".")[0] for l in rep.layers if l.after != l.before or l.merged is False}
    assert {"layer1", "layer4"} <= changed

    est = edp_det.prune_and_merge(m, flops_target=0.4, input_size=(3, 64, 64))
    assert 0.40 <= est.achieved_r_flops <= 0.41 and est.budget == "norm/estimated time"
    for layer in est.layers:
        rank_share, channel_share = _removed_share(layer)
        # at most floor(SPREAD · live) of a layer's groups per kind (channel prunable layers' rank: PM may merge)
        assert channel_share <= SPREAD, (layer.name, layer.before, layer.after)
        assert rank_share <= SPREAD + 1e-9, (layer.name, layer.before, layer.after)

    def kept(report, stage):
        return sum(l.flops_after for l in report.layers if l.name.startswith(stage)) / \
            sum(l.flops_before for l in report.layers if l.name.startswith(stage))
    assert kept(est, "layer4.") < kept(rep, "layer4.") - 0.2
    assert kept(est, "layer1.") > kept(rep, "layer1.")


def test_estimated_time_per_flop_of_resnet50():
    """1 + REUSE_POSITIONS / positions per layer (positions: ResNet-50's output map sizes at 224 px), normalised to
    a FLOPs-weighted mean of 1; a target beyond SPREAD of every layer is still reached under the weights."""
    from edp_det.edp.budget import REUSE_POSITIONS, SPREAD, structure_from_model

    m = torchvision.models.resnet50(num_classes=10).eval()
    edp_det.decompose(m)
    struct = structure_from_model(m, input_size=(3, 224, 224))
    w = struct.estimated_time_per_flop()
    positions = {"conv1": 112 * 112, "layer1.0.conv2": 56 * 56, "layer2.0.conv1": 56 * 56, "layer2.0.conv2": 28 * 28,
                 "layer3.2.conv3": 14 * 14, "layer4.0.conv2": 7 * 7, "layer4.2.conv1": 7 * 7}
    for name, p in positions.items():
        ratio = (1 + REUSE_POSITIONS / p) / (1 + REUSE_POSITIONS / 49)
        assert w[name] / w["layer4.2.conv1"] == pytest.approx(ratio, rel=1e-12), name
    dense = {l.name: l.positions * l.block.orig_in_channels * l.block.orig_out_channels * l.kk
             for l in struct.layers}
    assert sum(w[n] * dense[n] for n in w) / sum(dense.values()) == pytest.approx(1.0, rel=1e-12)
    assert len(w) == 53 and w["layer4.0.conv2"] > w["layer3.0.conv3"] > w["layer2.0.conv3"] > w["layer1.0.conv3"]

    # a cut beyond what SPREAD of every layer gives (0.83 here): the rest of the order comes after, and reaches it
    mm = copy.deepcopy(m)
    rep = edp_det.prune_and_merge(mm, flops_target=0.9, input_size=(3, 64, 64))
    assert 0.90 <= rep.achieved_r_flops <= 0.91
    assert max(1 - l.after[1] / l.before[1] for l in rep.layers if not l.merged) > SPREAD
    with pytest.raises(ValueError, match="layer_weights"):
        edp_det.prune_and_merge(copy.deepcopy(m), flops_target=0.4, input_size=(3, 64, 64), layer_weights="measured")


def test_rank_layers_tied_keeps_prunable_layers_dense():
    """``rank_layers="tied"``: the target is met by channels in channel-prunable layers (which PM then merges into
    one dense conv) and by rank only where outputs are tied to a residual add."""
    torch.manual_seed(0)
    m = torchvision.models.resnet50(num_classes=10).eval()
    edp_det.decompose(m)
    prunable = {n for n, b in edp_det.iter_blocks(m) if b.channel_prunable}
    assert "conv1" in prunable and "layer1.0.conv2" in prunable and "layer1.0.conv3" not in prunable
    x = torch.randn(2, 3, 64, 64)
    results = {}
    for mode in ("all", "tied"):
        mm = copy.deepcopy(m)
        rep = edp_det.prune_and_merge(mm, flops_target=0.5, input_size=(3, 64, 64), rank_layers=mode)
        assert 0.50 <= rep.achieved_r_flops <= 0.51
        recount = edp_det.count_flops(mm, input_size=(3, 64, 64))
        assert recount.flops == rep.flops_after and 1 - recount.flops / rep.flops_original >= 0.50
        with torch.no_grad():
            assert mm(x).shape == (2, 10)
        results[mode] = rep
    tied = {l.name: l for l in results["tied"].layers}
    for name in prunable:
        assert tied[name].merged, (name, tied[name])
    assert any(tied[n].after[2] < tied[n].before[2] for n in prunable)            # channels were cut
    assert any(not l.merged and l.after[1] < l.before[1] for n, l in tied.items() if n not in prunable)
    all_mode = {l.name: l for l in results["all"].layers}
    assert sum(not all_mode[n].merged for n in prunable) > 0    # the default does split prunable layers
    with pytest.raises(ValueError, match="rank_layers"):
        edp_det.prune_and_merge(copy.deepcopy(m), flops_target=0.5, input_size=(3, 64, 64), rank_layers="most")


def test_shortest_prefix_is_the_first_true_of_a_monotone_predicate():
    from edp_det.edp.budget import shortest_prefix

    calls = []
    for n in range(0, 40):
        for first in range(0, n + 1):
            calls.clear()

            def reaches(k, first=first):
                calls.append(k)
                return k >= first
            assert shortest_prefix(n, reaches) == first
            assert len(calls) <= 2 + max(n, 1).bit_length()     # bisection, not a scan


def test_shortest_prefix_from_a_guess_with_slack_reaches_and_stays_within_the_slack():
    """From any guess the answer reaches and is at most slack·k above the smallest k; with slack 0 it is exact;
    a guess close to the answer needs far fewer calls than a bisection over n."""
    from edp_det.edp.budget import shortest_prefix

    for n in (1, 7, 64, 1000):
        for first in sorted({1, n // 3, n // 2, n}):
            for guess in sorted({1, max(1, first // 3), first, min(n, 2 * first + 1), n}):
                for slack in (0.0, 0.125):
                    k = shortest_prefix(n, lambda m, f=first: m >= f, guess=guess, slack=slack)
                    assert first <= k <= first + max(1, int(slack * k)) - (slack == 0.0), (n, first, guess, slack, k)
    calls = []
    shortest_prefix(4096, lambda m: calls.append(m) or m >= 1000, guess=1000, slack=0.125)
    assert len(calls) <= 8 < 2 + 4096 .bit_length()


def test_score_policies_rank_groups_as_documented():
    import torch

    from edp_det.edp.budget import GivenScores, RelativeNorm

    norms = torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64)
    idx = torch.tensor([0, 2, 5])
    rel = RelativeNorm().score("a", "col", idx, norms)
    assert torch.equal(rel, torch.tensor([1.0, 0.25, 0.5], dtype=torch.float64))
    # a layer weighted 2 (twice as slow per FLOP) scores half: cut first
    assert torch.equal(RelativeNorm({"a": 2.0}).score("a", "col", idx, norms), rel / 2)
    given = torch.tensor([9.0, 0, 3.0, 0, 0, 1.0])                 # indexed by column, not by live position
    pol = GivenScores({("a", "col"): given}, fallback=RelativeNorm())
    assert torch.equal(pol.score("a", "col", idx, norms), torch.tensor([9.0, 3.0, 1.0], dtype=torch.float64))
    assert torch.equal(pol.score("b", "col", idx, norms), rel)      # no entry: the fallback
    s = pol.score("a", "col", idx, norms)
    assert int(torch.argmax(pol.strength("a", "col", norms, s))) == 0
    s2 = torch.tensor([0.1, 5.0, 0.2], dtype=torch.float64)
    assert int(torch.argmax(pol.strength("a", "col", norms, s2))) == 1   # the given score decides what stays
    assert int(torch.argmax(pol.strength("b", "col", norms, s2))) == 0   # the norms otherwise


def _reference_fixpoint(struct, zero):
    """Live masks by full passes over every layer until nothing changes (the definition, written out)."""
    beta, theta, own = [], [], []
    for l in struct.layers:
        b = l.block
        cols, rows = zero[l.name]
        bnz = (b.beta_2d() != 0) & ~cols[None, :]
        p = torch.zeros(b.out_channels, dtype=torch.bool)
        for t in l.row_params():
            p |= t != 0
        if rows is not None:
            bnz &= ~rows[:, None]
            p &= ~rows
        beta.append(bnz)
        theta.append((b.basis.weight.reshape(b.rank, b.in_channels, -1) != 0).any(dim=2))
        own.append(p)
    n = len(struct.layers)
    inp = [torch.ones(l.block.in_channels, dtype=torch.bool) for l in struct.layers]
    col = [torch.ones(l.block.rank, dtype=torch.bool) for l in struct.layers]
    row = [torch.ones(l.block.out_channels, dtype=torch.bool) for l in struct.layers]
    while True:
        before = [(a.clone(), c.clone(), r.clone()) for a, c, r in zip(inp, col, row)]
        for i, l in enumerate(struct.layers):
            if l.producer is not None:
                inp[i] = row[l.producer].clone()
            col[i] = (beta[i] & row[i][:, None]).any(dim=0) & (theta[i] & inp[i][None, :]).any(dim=1)
            if l.prunable:
                r = (beta[i] & col[i][None, :]).any(dim=1) | own[i]
                if l.consumers:
                    used = torch.zeros_like(r)
                    for c in l.consumers:
                        used |= (theta[c] & col[c][:, None]).any(dim=0)
                    r &= used
                row[i] = r
        if all(torch.equal(a, a0) and torch.equal(c, c0) and torch.equal(r, r0)
               for (a, c, r), (a0, c0, r0) in zip(zip(inp, col, row), before)):
            return inp, col, row


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 0.95])
def test_refresh_propagates_dead_channels_to_the_same_fixpoint_as_full_passes(fraction):
    """Structure.refresh (a worklist of the layers whose inputs changed, weight masks reused across calls) gives
    the live masks of the definition — full passes to a fixpoint — for random sets of zeroed groups, including
    ones that kill whole residual branches."""
    from edp_det.edp.budget import structure_from_model
    from edp_det.edp.decompose import decompose
    model = torchvision.models.resnet18()
    decompose(model)
    struct = structure_from_model(model, input_size=(3, 32, 32))
    masks = struct.weight_masks()
    g = torch.Generator().manual_seed(int(fraction * 100))
    zero = {l.name: (torch.rand(l.block.rank, generator=g) < fraction,
                     (torch.rand(l.block.out_channels, generator=g) < fraction) if l.prunable else None)
            for l in struct.layers}
    struct.refresh(zero=zero, masks=masks)
    inp, col, row = _reference_fixpoint(struct, zero)
    for l, a, c, r in zip(struct.layers, inp, col, row):
        assert torch.equal(l.in_live, a) and torch.equal(l.col_live, c) and torch.equal(l.row_live, r), l.name
    if fraction > 0:   # the case exercises propagation: input channels died with their producers' rows
        assert any(not bool(l.in_live.all()) for l in struct.layers)


def test_estimate_counts_positions_per_call_of_a_shared_layer():
    """The RPN head's conv runs once per FPN level: each call reads its weights, so its positions are counted per
    call (whole-detector scope); the body's layers at batch 1 are called once."""
    from _core_helpers import DET_KW
    from edp_det.edp.budget import REUSE_POSITIONS, structure_from_model

    m = edp_det.build_model("fasterrcnn", depth=18, norm="bn", **DET_KW).eval()
    edp_det.decompose(m, init="identity", scope="detector")
    struct = structure_from_model(m, input_size=(3, 64, 64))
    layers = {l.name: l for l in struct.layers}
    head = layers["rpn.head.conv.0.0"]
    assert head.calls == 5 and head.positions == 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1
    assert all(l.calls == 1 for n, l in layers.items() if n.startswith("backbone.body."))
    w = struct.estimated_time_per_flop()
    ref = "backbone.body.layer1.0.conv1"         # 16 × 16 positions at 64 px
    assert w[head.name] / w[ref] == pytest.approx((1 + REUSE_POSITIONS * 5 / head.positions) /
                                                  (1 + REUSE_POSITIONS / 256), rel=1e-12)
