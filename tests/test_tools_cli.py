"""Every tool in tools/: one error boundary (edp_det.harness.cli.cli_main) with the same exit statuses, and a
complete ``--help`` that answers without importing torch."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edp_det.harness.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py"))
# their parsers are built by the config-resolution helpers of edp_det.harness.cli; usage examples pending

_PROBE = r"""
import importlib.util, json, sys
out = {}
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("_probe_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    parser = mod.get_args_parser()
    out[path] = {"torch": "torch" in sys.modules, "description": parser.description, "epilog": parser.epilog}
print(json.dumps(out))
"""


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_tools_parsers_do_not_import_torch_and_describe_themselves():
    """Importing each tool and building its parser leaves torch unloaded (a fresh interpreter: this test process
    has torch already); the description is whole sentences and the epilog shows examples."""
    paths = [str(REPO / "tools" / f"{t}.py") for t in TOOLS]
    r = subprocess.run([sys.executable, "-c", _PROBE, *paths], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert len(info) == len(TOOLS) >= 9
    for path, d in info.items():
        name = Path(path).stem
        assert not d["torch"], f"{name}: building the parser imported torch"
        desc = " ".join((d["description"] or "").split())
        assert len(desc.split()) >= 8 and desc[0].isupper() and desc.endswith("."), f"{name}: {desc!r}"
        assert desc.count("(") == desc.count(")"), f"{name}: description cut off: {desc!r}"
        assert f"python tools/{name}.py" in (d["epilog"] or ""), f"{name}: no usage example in --help"


@pytest.mark.parametrize("tool", TOOLS)
def test_help_exits_0(tool):
    r = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), "--help"], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage:") and "Traceback" not in r.stdout


def test_no_sys_path_manipulation_in_tools():
    for t in TOOLS:
        text = (REPO / "tools" / f"{t}.py").read_text()
        assert "sys.path" not in text, t
        assert "cli_main(main, get_args_parser().parse_args()" in text, f"{t}: not run through cli_main"


# ------------------------------------------------------------------------------------------------ the boundary
def _run(fn, args=None, capsys=None):
    with pytest.raises(SystemExit) as e:
        cli_main(fn, args if args is not None else type("A", (), {})(), "tool")
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return e.value.code, err


def test_exit_statuses(capsys, tmp_path):
    from edp_det.runtime.errors import ConfigError
    from edp_det.train.engine import TrainingError

    def raiser(exc):
        def fn(args):
            raise exc
        return fn

    assert _run(raiser(ConfigError("x.yaml: train.lr='a': expected float")), capsys=capsys) == \
        (2, "tool: error: x.yaml: train.lr='a': expected float\n")
    code, err = _run(raiser(FileNotFoundError(2, "No such file or directory", "/no/file")), capsys=capsys)
    assert code == 2 and err == "tool: error: /no/file: No such file or directory\n"
    assert _run(raiser(TrainingError("loss is nan at epoch 2")), capsys=capsys)[0] == 1
    assert _run(raiser(KeyboardInterrupt()), capsys=capsys)[0] == 130
    with pytest.raises(ZeroDivisionError):   # a bug is not disguised as bad input
        cli_main(raiser(ZeroDivisionError()), None, "tool")
    assert cli_main(lambda a: 42, None, "tool") == 42


def test_output_dir_that_is_a_file_is_refused(capsys, tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    ran = []
    for dest, flag in (("output_dir", "--output-dir"), ("out", "--out")):
        args = type("A", (), {dest: str(f)})()
        code, err = _run(lambda a: ran.append(a), args, capsys)
        assert code == 2 and flag in err and "not a directory" in err and str(f) in err
    assert not ran and f.read_text() == "x"


@pytest.mark.parametrize("tool, argv", [
    ("make_synthetic_voc", ["--num-train", "1", "--num-test", "1", "--out"]),
    ("demo", ["--output-dir"]),
    ("compare", ["--config", str(REPO / "configs" / "tiny_synthetic.yaml"), "--output-dir"]),
    ("eval_det", ["--detections", "d.json", "--data-root", "voc", "--output-dir"]),
])
def test_tools_refuse_an_output_dir_that_is_a_file(tool, argv, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *argv, str(f)], capture_output=True,
                       text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "not a directory" in r.stderr


def test_ctrl_c_while_torch_writes_a_checkpoint(tmp_path, capsys, monkeypatch):
    """torch turns a Ctrl-C inside its zip writer into a RuntimeError raised while handling the KeyboardInterrupt:
    still one line and exit 130, and the previous checkpoint is intact (atomic write, no temp file left)."""
    import torch

    import edp_det.runtime.checkpoint as ckpt

    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save({"epoch": 1, "w": torch.zeros(10)}, path)
    real_fdopen = os.fdopen

    class Interrupting(io.RawIOBase):
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, b):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return self.f.write(b)

        def writable(self):
            return True

        def fileno(self):
            return self.f.fileno()

        def flush(self):
            self.f.flush()

        def close(self):
            super().close()   # flushes first
            self.f.close()

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode="r", *a: Interrupting(real_fdopen(fd, mode, *a)))
    seen = []

    def train(args):
        try:
            ckpt.atomic_save({"epoch": 2, "w": torch.ones(100000)}, path)
        except BaseException as e:
            seen.append(e)
            raise

    code, err = _run(train, capsys=capsys)
    assert isinstance(seen[0], RuntimeError) and isinstance(seen[0].__context__, KeyboardInterrupt)
    assert code == 130 and "interrupted" in err
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_ctrl_c_message_says_what_the_tool_leaves(capsys):
    """Tools that write checkpoints say they are intact; tools whose results are only written atomically (export,
    benchmark, eval_det) say that no partial file was left, and never speak of checkpoints."""
    from edp_det.harness.cli import INTERRUPTED_ATOMIC

    def interrupted(args):
        raise KeyboardInterrupt

    assert _run(interrupted, capsys=capsys) == (130, "tool: interrupted; checkpoints written so far are intact\n")
    with pytest.raises(SystemExit) as e:
        cli_main(interrupted, None, "export", interrupted=INTERRUPTED_ATOMIC)
    assert e.value.code == 130
    assert capsys.readouterr().err == "export: interrupted; no partially written file was left\n"
    for t in ("export", "benchmark", "eval_det"):
        text = (REPO / "tools" / f"{t}.py").read_text()
        assert f'parse_args(), "{t}", interrupted=INTERRUPTED_ATOMIC)' in text, t
    for t in ("make_synthetic_voc", "make_synthetic_imagefolder"):     # they write many files, not checkpoints
        text = (REPO / "tools" / f"{t}.py").read_text()
        assert f'parse_args(), "{t}", interrupted=INTERRUPTED_DATASET)' in text, t


def test_default_device_follows_cuda_availability(monkeypatch):
    import torch

    from edp_det.harness.cli import default_device, resolve_device
    from edp_det.runtime.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu" and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device='cuda': CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device='gpu0' is not a device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    for t in ("eval_det", "benchmark", "export", "demo"):   # no tool pins the CPU
        text = (REPO / "tools" / f"{t}.py").read_text()
        assert '"--device", default=None' in text, t
