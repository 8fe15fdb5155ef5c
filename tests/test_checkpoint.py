import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from edp_det.runtime import checkpoint as ckpt
from edp_det.runtime.checkpoint import (
    CheckpointManager,
    atomic_save,
    load_checkpoint,
    resolve_resume,
    to_plain,
)
from edp_det.runtime.errors import CheckpointError

UNPICKLED = []


def _side_effect(tag):
    UNPICKLED.append(tag)
    return tag


class Evil:
    """Unpickling this calls _side_effect: load_checkpoint must never do so."""

    def __reduce__(self):
        return (_side_effect, ("evil",))


class Custom:
    def __init__(self):
        self.x = 1


def _state():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return model, opt


def _tmp_leftovers(directory):
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


def test_round_trip_weights_only(tmp_path):
    model, opt = _state()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "best": 0.5,
        "ok": True,
        "none": None,
        "sizes": (1, (2, 3)),
        "path": Path("/a/b"),
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(7),
        "np_array": np.arange(4),
        "param": torch.nn.Parameter(torch.ones(2)),
        "dtype": torch.float16,
    }
    p = atomic_save(state, tmp_path / "c.pt")
    assert p == tmp_path / "c.pt" and _tmp_leftovers(tmp_path) == []
    # loads with plain torch.load(weights_only=True) too
    raw = torch.load(p, weights_only=True)
    out = load_checkpoint(p)
    for loaded in (raw, out):
        assert loaded["sizes"] == [1, [2, 3]] and loaded["path"] == "/a/b"
        assert loaded["np_scalar"] == 1.5 and type(loaded["np_scalar"]) is float
        assert loaded["np_int"] == 7 and type(loaded["np_int"]) is int
        assert torch.equal(loaded["np_array"], torch.arange(4))
        assert type(loaded["param"]) is torch.Tensor and torch.equal(loaded["param"], torch.ones(2))
        assert loaded["dtype"] is torch.float16 and loaded["none"] is None and loaded["ok"] is True
    model2, opt2 = _state()
    model2.load_state_dict(out["model"])
    opt2.load_state_dict(out["optimizer"])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert out["model"]._metadata == model.state_dict()._metadata  # OrderedDict metadata kept
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])


def test_to_plain_rejects_non_plain_objects():
    with pytest.raises(TypeError, match=r"checkpoint\.model.*Sequential"):
        to_plain({"model": torch.nn.Sequential()})
    with pytest.raises(TypeError, match="Custom"):
        to_plain([1, Custom()])
    Point = collections.namedtuple("Point", "x y")
    assert to_plain({"p": Point(1, (2,))}) == {"p": {"x": 1, "y": [2]}}


def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"v": torch.tensor([1.0])}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial-bytes" * 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": torch.tensor([2.0])}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(path)["v"].item() == 1.0

    # the same holds for a first save: nothing at all under the final name
    with pytest.raises(OSError):
        atomic_save({"v": 1}, tmp_path / "new.pt")
    assert os.listdir(tmp_path) == ["ckpt.pt"]

    # and for interruption (KeyboardInterrupt is a BaseException)
    def interrupted(obj, f, *a, **k):
        f.write(b"x" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": 3}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_save_full_disk_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """torch's writer reports a full disk as an internal RuntimeError; the caller gets a WriteError naming the file
    and the free space, the previous file stays, and a tool exits 2 with that one line."""
    from edp_det.harness.cli import cli_main
    from edp_det.runtime.errors import WriteError

    path = tmp_path / "model_final.pt"
    atomic_save({"v": torch.tensor([1.0])}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"PK\x03\x04" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda d: collections.namedtuple("U", "total used free")(
        10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(WriteError, match=r"model_final\.pt: could not be written \(no space left on the device: "
                                         r"1\.0 MiB free\); the previous file is unchanged"):
        atomic_save({"v": torch.tensor([2.0])}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model_final.pt"]

    with pytest.raises(SystemExit) as e:
        cli_main(lambda args: atomic_save({"v": 2}, tmp_path / "new.pt"), None, "train_det")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "new.pt: could not be written (no space left" in err[0] and "nothing was written" in err[0]
    assert os.listdir(tmp_path) == ["model_final.pt"]

    # a Ctrl-C that torch wraps into its RuntimeError stays an interruption (exit 130), not a write error
    def interrupted(obj, f, *a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            raise RuntimeError("[enforce fail] write interrupted") from ki

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(RuntimeError, match="write interrupted"):
        atomic_save({"v": 3}, path)
    with pytest.raises(SystemExit) as e:
        cli_main(lambda args: atomic_save({"v": 3}, path), None, "train_det")
    assert e.value.code == 130 and path.read_bytes() == before


def test_atomic_save_failure_in_replace(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"v": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("replace failed")))
    with pytest.raises(OSError, match="replace failed"):
        atomic_save({"v": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_save_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_save({"a": 1}, tmp_path / "sub" / "m.pt")  # parent created
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o644


def test_manager_rotation_and_pointer(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None
    for epoch in range(5):
        p = mgr.save({"epoch_seen": epoch, "w": torch.full((2,), float(epoch))}, epoch)
        assert p.name == f"checkpoint_epoch{epoch:04d}.pt"
        assert mgr.latest() == p
        assert (tmp_path / "last_checkpoint").read_text().strip() == p.name
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt"))
    assert names == ["checkpoint_epoch0003.pt", "checkpoint_epoch0004.pt"]
    state = load_checkpoint(mgr.latest())
    assert state["epoch"] == 4 and state["epoch_seen"] == 4  # manager records the epoch

    # tagged checkpoints are neither rotated nor pointed to
    best = mgr.save({"w": 1}, epoch=4, tag="best")
    assert best.name == "checkpoint_best.pt" and mgr.latest().name == "checkpoint_epoch0004.pt"
    # saving an older epoch (e.g. resumed from an earlier file) never deletes the file just written
    mgr1 = CheckpointManager(tmp_path, keep_last=1)
    p = mgr1.save({"w": 2}, epoch=1)
    assert p.exists() and mgr1.latest() == p
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["checkpoint_best.pt",
                                                                           "checkpoint_epoch0001.pt"]
    assert _tmp_leftovers(tmp_path) == []

    keep_all = CheckpointManager(tmp_path / "all", keep_last=None)
    for e in range(4):
        keep_all.save({}, e)
    assert len(keep_all.checkpoints()) == 4
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError):
        mgr.save({}, epoch=1, tag="../evil")


def test_latest_falls_back_when_pointer_is_stale(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save({}, 1)
    mgr.save({}, 2)
    (tmp_path / "last_checkpoint").write_text("checkpoint_epoch0099.pt\n")
    assert mgr.latest().name == "checkpoint_epoch0002.pt"
    (tmp_path / "last_checkpoint").unlink()
    assert mgr.latest().name == "checkpoint_epoch0002.pt"


def test_resolve_resume(tmp_path):
    out = tmp_path / "run"
    assert resolve_resume(None, out) is None
    assert resolve_resume(False, out) is None
    assert resolve_resume("", out) is None
    assert resolve_resume("auto", out) is None  # nothing yet: start fresh
    assert resolve_resume(True, out) is None
    mgr = CheckpointManager(out)
    mgr.save({}, 1)
    last = mgr.save({}, 2)
    assert resolve_resume("auto", out) == last
    assert resolve_resume(True, out) == last
    assert resolve_resume("AUTO", out) == last
    assert resolve_resume(str(out / "checkpoint_epoch0001.pt"), None) == out / "checkpoint_epoch0001.pt"
    assert resolve_resume(out, tmp_path / "elsewhere") == last  # a directory: its latest
    assert CheckpointManager.resolve_resume("auto", out) == last
    with pytest.raises(CheckpointError, match="nope.pt"):
        resolve_resume(tmp_path / "nope.pt", out)
    (tmp_path / "run2").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume(tmp_path / "run2", out)


def test_load_errors_name_file_and_problem(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(100)}, good)
    data = good.read_bytes()

    cases = {}
    cases["missing"] = (tmp_path / "missing.pt", "file not found")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.pt", "empty file")
    (tmp_path / "text.pt").write_text("model: resnet\n")
    cases["text"] = (tmp_path / "text.pt", "not a torch checkpoint")
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    cases["trunc"] = (tmp_path / "trunc.pt", "truncated")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(100)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy_trunc.pt").write_bytes(legacy.read_bytes()[:40])
    cases["legacy_trunc"] = (tmp_path / "legacy_trunc.pt", "truncated")
    cases["dir"] = (tmp_path, "directory")

    for name, (path, what) in cases.items():
        with pytest.raises(CheckpointError) as ei:
            load_checkpoint(path)
        msg = str(ei.value)
        assert str(path) in msg and what in msg, (name, msg)
        assert "\n" not in msg, (name, msg)
        assert ei.value.__suppress_context__ or ei.value.__cause__ is None

    assert load_checkpoint(legacy)["w"].shape == (100,)


def test_pickled_classes_are_refused_not_unpickled(tmp_path):
    UNPICKLED.clear()
    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, p)  # torch.save directly: atomic_save would refuse it
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    msg = str(ei.value)
    assert str(p) in msg and "pickled Python objects" in msg and "_side_effect" in msg
    assert UNPICKLED == []

    p2 = tmp_path / "custom.pt"
    torch.save({"obj": Custom()}, p2)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(.*Custom\)"):
        load_checkpoint(p2)

    p3 = tmp_path / "raw.pkl"
    with open(p3, "wb") as f:
        pickle.dump(Evil(), f, protocol=2)
    with pytest.raises(CheckpointError, match="raw.pkl"):
        load_checkpoint(p3)
    p4 = tmp_path / "raw4.pkl"
    with open(p4, "wb") as f:
        pickle.dump({"a": Evil()}, f, protocol=4)
    with pytest.raises(CheckpointError, match="raw4.pkl"):
        load_checkpoint(p4)
    assert UNPICKLED == []

    with pytest.raises(TypeError):
        atomic_save({"model": Evil()}, tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists() and _tmp_leftovers(tmp_path) == []


class BlockedModule:
    """Unpickling this would call ``os.getpid`` (torch refuses modules such as os with another wording)."""

    def __reduce__(self):
        return (os.getpid, ())


def _a_function():
    return 1


def test_pickled_objects_message_says_refused_for_safety(tmp_path):
    """Every kind of pickled object (a custom class instance, a function reference, a callable from a module torch
    blocks outright) is reported as code/objects other than tensors, refused for safety, never as a corrupted file
    and never with torch's advice to retry with weights_only=False."""
    for name, obj, what in (("instance", {"obj": Custom()}, "Custom"), ("function", {"fn": _a_function}, "_a_function"),
                            ("blocked", {"x": BlockedModule()}, "getpid")):
        p = tmp_path / f"{name}.pt"
        torch.save(obj, p)
        with pytest.raises(CheckpointError) as ei:
            load_checkpoint(p)
        msg = str(ei.value)
        assert str(p) in msg and what in msg and "\n" not in msg, msg
        assert "pickled Python objects" in msg and "other than tensors" in msg and "refused for safety" in msg, msg
        assert "weights_only" not in msg and "corrupt" not in msg and "safe_globals" not in msg, msg


def test_map_location(tmp_path):
    p = atomic_save({"w": torch.ones(2)}, tmp_path / "m.pt")
    out = load_checkpoint(p, map_location=torch.device("cpu"))
    assert out["w"].device.type == "cpu"


def test_a_torchscript_archive_is_named_as_such(tmp_path):
    """A ``torch.jit.save`` file (what ``tools/export.py --format torchscript`` writes) given where a checkpoint or
    model file is expected: one line saying what it is, no torch warning; a plain ``torch.save`` zip is not one."""
    import warnings

    ts = tmp_path / "m.ts.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(ts))
    assert ckpt.is_torchscript_archive(ts) and not ckpt.is_torchscript_archive(tmp_path / "missing.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="a TorchScript archive .*torch.jit.load") as e:
            load_checkpoint(ts)
    assert len(str(e.value).splitlines()) == 1
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    assert not ckpt.is_torchscript_archive(plain) and torch.equal(load_checkpoint(plain)["w"], torch.ones(2))
