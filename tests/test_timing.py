"""edp_det.deploy.timing: the protocol's order, warm-up, rounds, samples and statistics, on a fake clock (no test
depends on how fast this machine is)."""
import re
import statistics
from pathlib import Path

import pytest
import torch

from edp_det.deploy.timing import Timings, synchronize, time_alternating


class FakeClock:
    """A clock that only moves when a fake workload says so; it logs every call and read."""

    def __init__(self):
        self.now = 0.0
        self.log: list = []

    def __call__(self) -> float:
        self.log.append("clock")
        return self.now

    def workload(self, name, durations):
        """A variant whose k-th call takes ``durations[k % len(durations)]`` seconds."""
        calls = [0]

        def run():
            self.log.append(name)
            self.now += durations[calls[0] % len(durations)]
            calls[0] += 1
        return run


def _calls(log):
    return [e for e in log if e != "clock"]


def test_warmup_then_rotated_rounds():
    clock = FakeClock()
    variants = {n: clock.workload(n, [1.0]) for n in "abc"}
    time_alternating(variants, rounds=4, iters=2, warmup=1, clock=clock)
    calls = _calls(clock.log)
    assert calls[:3] == ["a", "b", "c"]                       # one untimed warm-up each, in the given order
    turns = [calls[3 + 2 * k] for k in range(12)]             # first call of every turn
    assert turns == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert calls[3:] == [t for t in turns for _ in range(2)]  # a turn is ``iters`` calls of one variant


def test_warmup_calls_are_not_timed_and_round_warmup_precedes_every_turn():
    clock = FakeClock()
    # the first (warm-up) call of each variant is slow; a round warm-up call costs 100 s: neither may be recorded
    a = clock.workload("a", [50.0, 100.0, 1.0, 1.0, 100.0, 2.0, 2.0])
    b = clock.workload("b", [60.0, 100.0, 3.0, 3.0, 100.0, 4.0, 4.0])
    timed = time_alternating({"a": a, "b": b}, rounds=2, iters=2, warmup=1, round_warmup=1, clock=clock)
    assert timed.samples == {"a": [[1.0, 1.0], [2.0, 2.0]], "b": [[3.0, 3.0], [4.0, 4.0]]}
    assert _calls(clock.log) == ["a", "b", "a", "a", "a", "b", "b", "b", "b", "b", "b", "a", "a", "a"]
    # clock reads bracket the timed calls only: two per timed call
    assert clock.log.count("clock") == 2 * 2 * 2 * 2


def test_per_call_samples_versus_one_block_per_turn():
    durations = [1.0, 2.0, 6.0]
    clock = FakeClock()
    per_call = time_alternating({"x": clock.workload("x", durations)}, rounds=2, iters=3, warmup=0, clock=clock)
    assert per_call.samples["x"] == [durations, durations]
    assert clock.log.count("clock") == 2 * 3 * 2
    clock = FakeClock()
    block = time_alternating({"x": clock.workload("x", durations)}, rounds=2, iters=3, warmup=0, per_call=False,
                             clock=clock)
    assert block.samples["x"] == [[3.0], [3.0]]                # the turn's time / iters
    assert clock.log.count("clock") == 2 * 2


def test_statistics_are_computed_from_the_recorded_samples():
    clock = FakeClock()
    # per round, a's iterations: [1, 3, 2] then [5, 9, 7] then [2, 2, 8]; b always twice as slow as a's median
    a = clock.workload("a", [1.0, 3.0, 2.0, 5.0, 9.0, 7.0, 2.0, 2.0, 8.0])
    b = clock.workload("b", [4.0, 4.0, 4.0, 14.0, 14.0, 14.0, 4.0, 4.0, 4.0])
    timed = time_alternating({"a": a, "b": b}, rounds=3, iters=3, warmup=0, clock=clock)
    assert timed.names == ["a", "b"]
    assert timed.round_values("a") == [2.0, 7.0, 2.0]
    assert timed.round_values("b") == [4.0, 14.0, 4.0]
    assert timed.median("a") == 2.0 and timed.medians() == {"a": 2.0, "b": 4.0}
    assert timed.pooled("a") == [1.0, 3.0, 2.0, 5.0, 9.0, 7.0, 2.0, 2.0, 8.0]
    assert timed.round_ratios("b", "a") == [2.0, 2.0, 2.0]
    assert timed.ratios("a") == {"a": 1.0, "b": 2.0}
    assert timed.ratio_ranges("b") == {"a": (0.5, 0.5), "b": (1.0, 1.0)}


def test_ratios_are_formed_within_a_round():
    # a slow phase (round 1) doubles both variants: the per-round ratio is unchanged, the pooled medians are not
    t = Timings({"base": [[1.0], [2.0], [1.0]], "v": [[0.5], [1.0], [0.5]]})
    assert t.round_ratios("v", "base") == [0.5, 0.5, 0.5]
    assert t.ratios("base")["v"] == 0.5
    t = Timings({"base": [[1.0], [4.0], [2.0]], "v": [[2.0], [2.0], [2.0]]})
    assert t.ratios("base")["v"] == statistics.median([2.0, 0.5, 1.0])
    assert t.ratio_ranges("base")["v"] == (0.5, 2.0)


def test_cuda_device_is_synchronised_around_every_clock_read(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: clock.log.append("sync"))
    time_alternating({"a": clock.workload("a", [1.0])}, rounds=1, iters=2, warmup=1, device="cuda", clock=clock)
    assert clock.log == ["a"] + ["sync", "clock", "a", "sync", "clock"] * 2
    clock.log.clear()
    time_alternating({"a": clock.workload("a", [1.0])}, rounds=1, iters=2, warmup=0, per_call=False,
                     device=torch.device("cuda", 0), clock=clock)
    assert clock.log == ["sync", "clock", "a", "a", "sync", "clock"]
    clock.log.clear()
    time_alternating({"a": clock.workload("a", [1.0])}, rounds=1, iters=1, warmup=0, device="cpu", clock=clock)
    assert clock.log == ["clock", "a", "clock"]
    synchronize(None)   # no device: nothing to wait for


def test_real_clock_records_non_negative_samples():
    timed = time_alternating({"a": lambda: None, "b": lambda: None}, rounds=2, iters=3)
    assert [len(r) for r in timed.samples["a"]] == [3, 3] and min(timed.pooled("b")) >= 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(rounds=0, iters=1), "rounds"), (dict(rounds=1, iters=0), "iters"),
    (dict(rounds=1, iters=1, warmup=-1), "warmup"), (dict(rounds=1, iters=1, round_warmup=-1), "round_warmup"),
    (dict(rounds=True, iters=1), "rounds"), (dict(rounds=1.0, iters=1), "rounds"),
])
def test_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_alternating({"a": lambda: None}, **kwargs)


def test_bad_variants():
    with pytest.raises(ValueError, match="non-empty"):
        time_alternating({}, rounds=1, iters=1)
    with pytest.raises(ValueError, match="non-empty"):
        time_alternating([lambda: None], rounds=1, iters=1)
    with pytest.raises(ValueError, match="'a' is not callable"):
        time_alternating({"a": 3}, rounds=1, iters=1)


def test_one_place_synchronises_and_benchmarks_use_the_installed_package():
    """The protocol has one home: nothing else in the library, tools or benchmarks drains a device queue itself,
    and the benchmark scripts import the installed package instead of editing ``sys.path``."""
    repo = Path(__file__).resolve().parents[1]
    home = repo / "edp_det" / "deploy" / "timing.py"
    files = [p for d in ("edp_det", "tools", "benchmarks") for p in sorted((repo / d).rglob("*.py"))]
    assert home in files and any(p.parent.name == "benchmarks" for p in files)
    own_sync = [str(p.relative_to(repo)) for p in files
                if p != home and re.search(r"\b(cuda|mps)\.synchronize\(", p.read_text())]
    assert own_sync == []
    path_edits = [str(p.relative_to(repo)) for p in files
                  if p.parent.name == "benchmarks" and "sys.path" in p.read_text()]
    assert path_edits == []
