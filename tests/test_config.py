import os
import textwrap

import pytest
import yaml

from edp_det.runtime.config import (
    config_hash,
    deep_merge,
    dump_config,
    flatten,
    get_by_dotted,
    load_config,
    parse_overrides,
    set_by_dotted,
)
from edp_det.runtime.errors import ConfigError

DEFAULTS = {
    "model": {"name": "resnet18", "depth": 18, "pretrained": False, "kwargs": {}},
    "train": {"lr": 0.01, "epochs": 12, "milestones": [8, 11], "amp": False, "resume": None},
    "data": {"root": "data/voc", "classes": ["a", "b"]},
    "output_dir": "runs/x",
    "seed": 0,
}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tree(tmp_path):
    """root.yaml -> ../base/mid.yaml -> sub/bottom.yaml (relative to each including file)."""
    write(tmp_path / "base/sub/bottom.yaml", """
        model: {name: resnet50, depth: 50, kwargs: {norm: bn, width: 64}}
        train: {lr: 0.1, epochs: 24, milestones: [16, 22]}
        data: {root: /bottom}
    """)
    write(tmp_path / "base/mid.yaml", """
        _base_: sub/bottom.yaml
        model: {kwargs: {width: 32}}
        train: {lr: 0.02}
    """)
    root = write(tmp_path / "configs/root.yaml", """
        _base_: ../base/mid.yaml
        train: {epochs: 6, milestones: [4]}
        seed: 3
    """)
    return root


def test_base_inheritance_two_levels_and_deep_merge(tree):
    cfg = load_config(tree)
    assert cfg == {
        "model": {"name": "resnet50", "depth": 50, "kwargs": {"norm": "bn", "width": 32}},
        "train": {"lr": 0.02, "epochs": 6, "milestones": [4]},  # lists replace, never concatenate
        "data": {"root": "/bottom"},
        "seed": 3,
    }
    assert "_base_" not in cfg


def test_defaults_are_bottom_layer(tree):
    cfg = load_config(tree, defaults=DEFAULTS)
    assert cfg["train"] == {"lr": 0.02, "epochs": 6, "milestones": [4], "amp": False, "resume": None}
    assert cfg["data"] == {"root": "/bottom", "classes": ["a", "b"]}
    assert cfg["output_dir"] == "runs/x"
    assert cfg["model"]["kwargs"] == {"norm": "bn", "width": 32}  # {} default = open mapping
    assert DEFAULTS["model"]["kwargs"] == {}  # caller's defaults untouched


def test_base_list_and_absolute_path(tmp_path):
    a = write(tmp_path / "a.yaml", "seed: 1\ntrain: {lr: 0.5, epochs: 2}\n")
    b = write(tmp_path / "x/b.yaml", "seed: 2\n")
    c = write(tmp_path / "y/c.yaml", f"_base_: [{a}, ../x/b.yaml]\ntrain: {{epochs: 9}}\n")
    assert load_config(c) == {"seed": 2, "train": {"lr": 0.5, "epochs": 9}}


def test_deep_merge_semantics():
    base = {"a": {"b": 1, "c": {"d": 2}}, "l": [1, 2], "s": "x", "n": {"k": 1}}
    over = {"a": {"c": {"e": 3}}, "l": [3], "s": {"now": "dict"}, "n": None}
    out = deep_merge(base, over)
    assert out == {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "l": [3], "s": {"now": "dict"}, "n": None}
    assert base["a"]["c"] == {"d": 2}  # inputs not mutated
    out["l"].append(9)
    assert over["l"] == [3]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1e-3", 0.001),
        ("-2.5E+4", -25000.0),
        ("5e4", 50000.0),
        ("0.1", 0.1),
        (".5", 0.5),
        ("7", 7),
        ("true", True),
        ("False", False),
        ("[1, 2]", [1, 2]),
        ("[1e-3,2]", [0.001, 2]),
        ("null", None),
        ("~", None),
        ("hello", "hello"),
        ("'1e-3'", "1e-3"),
        ("a=b", "a=b"),
        ("{x: 1}", {"x": 1}),
        ("", ""),
    ],
)
def test_override_value_parsing(text, expected):
    [(key, value)] = parse_overrides([f"a.b={text}"])
    assert key == "a.b"
    assert value == expected and type(value) is type(expected)


def test_scientific_notation_in_files(tmp_path):
    p = write(tmp_path / "c.yaml", "train: {lr: 1e-3, wd: 5E-4, big: 1e6, name: '1e-3', ver: 1.2.3}\n")
    cfg = load_config(p)
    assert cfg["train"] == {"lr": 0.001, "wd": 0.0005, "big": 1e6, "name": "1e-3", "ver": "1.2.3"}


def test_overrides_applied_last_and_typed(tree):
    cfg = load_config(
        tree,
        overrides=["train.lr=1e-3", "train.amp=true", "train.milestones=[1,2,3]", "train.resume=null",
                   "model.kwargs.extra=[1]", "output_dir=2024", "train.lr=2", "seed=7", "model.kwargs={width: 8}"],
        defaults=DEFAULTS,
    )
    assert cfg["train"]["lr"] == 2.0 and isinstance(cfg["train"]["lr"], float)  # int accepted where float expected
    assert cfg["train"]["amp"] is True
    assert cfg["train"]["milestones"] == [1, 2, 3]
    assert cfg["train"]["resume"] is None
    assert cfg["output_dir"] == "2024"  # str key keeps literal text
    assert cfg["seed"] == 7
    assert cfg["model"]["kwargs"] == {"norm": "bn", "width": 8, "extra": [1]}  # mapping override merges


def test_overrides_without_defaults_create_keys():
    cfg = load_config(None, overrides=["a.b.c=1", "a.d=x"])
    assert cfg == {"a": {"b": {"c": 1}, "d": "x"}}
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, overrides=["oops"])
    with pytest.raises(ConfigError, match="'a.b' is a int"):
        load_config(None, overrides=["a.b=1", "a.b.c=2"])


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    write(tmp_path / "base.yaml", "train: {lr: 0.1}\n")
    p = write(tmp_path / "child.yaml", "_base_: base.yaml\ntrain: {lrr: 0.2}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, defaults=DEFAULTS)
    msg = str(ei.value)
    assert str(p) in msg and "'train.lrr'" in msg and "did you mean 'train.lr'" in msg

    # error in a base file names the base file, not the including one
    bad_base = write(tmp_path / "bad_base.yaml", "modle: {depth: 50}\n")
    p2 = write(tmp_path / "child2.yaml", "_base_: bad_base.yaml\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p2, defaults=DEFAULTS)
    assert str(bad_base) in str(ei.value) and "'modle'" in str(ei.value) and "'model'" in str(ei.value)

    # a key at the wrong level suggests where it lives
    p3 = write(tmp_path / "c3.yaml", "epochs: 3\n")
    with pytest.raises(ConfigError, match=r"did you mean 'train\.epochs'"):
        load_config(p3, defaults=DEFAULTS)


def test_unknown_key_on_command_line(tree):
    with pytest.raises(ConfigError) as ei:
        load_config(tree, overrides=["train.epoch=3"], defaults=DEFAULTS)
    msg = str(ei.value)
    assert "command line" in msg and "'train.epoch'" in msg and "'train.epochs'" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=1.5", "train.epochs"),  # float where int expected
        ("train.lr=fast", "train.lr"),
        ("train.amp=1", "train.amp"),  # int is not bool
        ("seed=true", "seed"),  # bool is not int
        ("train.milestones=3", "train.milestones"),
        ("model=resnet", "model"),
        ("train.lr=null", "train.lr"),
    ],
)
def test_type_mismatch_on_command_line(override, key):
    with pytest.raises(ConfigError) as ei:
        load_config(None, overrides=[override], defaults=DEFAULTS)
    msg = str(ei.value)
    assert f"'{key}'" in msg and "expected" in msg and "command line" in msg


def test_type_mismatch_in_file(tmp_path):
    p = write(tmp_path / "t.yaml", "train:\n  epochs: twelve\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, defaults=DEFAULTS)
    msg = str(ei.value)
    assert str(p) in msg and "'train.epochs'" in msg and "'twelve'" in msg and "expected int" in msg


def test_cycle_detection(tmp_path):
    write(tmp_path / "a.yaml", "_base_: sub/b.yaml\nseed: 1\n")
    write(tmp_path / "sub/b.yaml", "_base_: ../a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_diamond_is_not_a_cycle(tmp_path):
    write(tmp_path / "common.yaml", "seed: 1\ntrain: {lr: 0.5}\n")
    write(tmp_path / "l.yaml", "_base_: common.yaml\ntrain: {epochs: 1}\n")
    write(tmp_path / "r.yaml", "_base_: common.yaml\noutput_dir: r\n")
    top = write(tmp_path / "top.yaml", "_base_: [l.yaml, r.yaml]\n")
    assert load_config(top) == {"seed": 1, "train": {"lr": 0.5, "epochs": 1}, "output_dir": "r"}


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path / "bad.yaml", "model:\n  name: resnet\n  depth: [1, 2\ntrain: {}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and "line " in msg
    line = int(msg.split("line ")[1].split(",")[0])
    assert line in (3, 4)

    p2 = write(tmp_path / "tabs.yaml", "a: 1\nb: 2\n\tc: 3\n")
    with pytest.raises(ConfigError, match=r"tabs\.yaml, line 3"):
        load_config(p2)


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(write(tmp_path / "inc.yaml", "_base_: missing.yaml\n"))
    assert load_config(write(tmp_path / "empty.yaml", "")) == {}


def test_dump_load_round_trip(tmp_path, tree):
    cfg = load_config(tree, overrides=["train.lr=1e-7", "data.root='1e-3'", "output_dir=yes"], defaults=DEFAULTS)
    cfg["extra_float"] = float("inf")  # dump/load of an open dict with odd values
    out = tmp_path / "out/config.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again["data"]["root"] == "1e-3" and again["output_dir"] == "yes"
    assert config_hash(again) == config_hash(cfg)
    assert [f for f in os.listdir(out.parent) if f != "config.yaml"] == []  # no temp files left
    assert yaml.safe_load(out.read_text())["train"]["milestones"] == [4]  # readable by plain PyYAML


def test_config_hash_stable_and_sensitive():
    a = {"x": 1, "y": {"z": [1, 2], "w": 0.5}}
    b = {"y": {"w": 0.5, "z": [1, 2]}, "x": 1}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 10 and config_hash(a) == "%s" % config_hash(a)
    assert config_hash(a) != config_hash({"x": 1, "y": {"z": [1, 2], "w": 0.25}})
    assert config_hash({"t": (1, 2)}) == config_hash({"t": [1, 2]})


def test_flatten_get_set_by_dotted():
    cfg = {"a": {"b": 1, "c": {"d": [1]}}, "e": {}, "f": None}
    assert flatten(cfg) == {"a.b": 1, "a.c.d": [1], "e": {}, "f": None}
    set_by_dotted(cfg, "a.c.x", 5)
    set_by_dotted(cfg, "f.g", 6)  # None becomes a mapping
    set_by_dotted(cfg, "new.deep.key", True)
    assert cfg["a"]["c"] == {"d": [1], "x": 5} and cfg["f"] == {"g": 6} and cfg["new"] == {"deep": {"key": True}}
    assert get_by_dotted(cfg, "a.c.x") == 5
    assert get_by_dotted(cfg, "a.zz", default="dflt") == "dflt"
    with pytest.raises(KeyError):
        get_by_dotted(cfg, "a.b.c")
    with pytest.raises(ConfigError):
        set_by_dotted(cfg, "a.b.c", 1)
    with pytest.raises(ConfigError):
        set_by_dotted(cfg, "a..b", 1)


# ------------------------------------------------------------------------------------ typed run schema
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = CONFIGS / "tiny_synthetic.yaml"


def _resolve(config, *overrides, **kw):
    from edp_det.harness.run_config import resolve_config

    task = kw.pop("task", "detection")
    return resolve_config(config, list(overrides), task=task, **kw)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_resolves_with_its_method_options_only(path):
    from edp_det.methods import METHODS
    from edp_det.runtime.schema import schema_tree

    task = "classification" if "imagenet" in path.stem or "imagefolder" in path.stem else "detection"
    cfg = _resolve(path, task=task)
    assert set(cfg["compress"]) == set(schema_tree(METHODS[cfg["method"]].Options))
    assert "method_args" not in cfg["compress"]


def test_options_of_another_method_are_rejected_naming_key_method_and_nearest():
    with pytest.raises(ConfigError) as ei:
        _resolve(TINY, "method=l1_filter", "compress.compact=true")
    msg = str(ei.value)
    assert "'compress.compact'" in msg and "'l1_filter'" in msg and "edp" in msg and "nearest valid key" in msg
    with pytest.raises(ConfigError) as ei:       # an old key: named with its new name
        _resolve(TINY, "method=l1_filter", "compress.latency_aware=true")
    assert "'compress.latency_aware' was renamed 'compress.latency.aware'" in str(ei.value)
    assert "'l1_filter'" in str(ei.value)
    with pytest.raises(ConfigError, match=r"'compress\.latency' is an option of method edp.*not an option of "
                                          r"method 'l1_filter'"):
        _resolve(TINY, "method=l1_filter", "compress.latency.aware=true")
    with pytest.raises(ConfigError, match=r"'compress\.lamda_rank'.*method 'edp'.*'compress\.lambda_rank'"):
        _resolve(TINY, "compress.lamda_rank=1")
    with pytest.raises(ConfigError, match=r"'compress\.lambda_channel'.*method 'edp_rank'"):
        _resolve(TINY, "method=edp_rank", "compress.lambda_channel=1")
    with pytest.raises(ConfigError, match=r"'compress\.slimming_lambda' = 0\.0 is out of range"):
        _resolve(TINY, "method=slimming", "compress.slimming_lambda=0")


def test_a_file_that_selects_a_method_may_not_set_options_of_another(tmp_path):
    p = write(tmp_path / "c.yaml", f"_base_: {TINY}\nmethod: baseline\ncompress: {{lambda_rank: 3}}\n")
    with pytest.raises(ConfigError) as ei:
        _resolve(p)
    assert str(p) in str(ei.value) and "'compress.lambda_rank'" in str(ei.value) and "'baseline'" in str(ei.value)


def test_renamed_keys_fail_with_the_new_name(tmp_path):
    with pytest.raises(ConfigError, match=r"'compress\.method_args\.slimming_lambda' was renamed "
                                          r"'compress\.slimming_lambda'"):
        _resolve(TINY, "method=slimming", "compress.method_args.slimming_lambda=1")
    p = write(tmp_path / "old.yaml", f"_base_: {TINY}\ncompress: {{latency_mode: average}}\n")
    with pytest.raises(ConfigError, match=r"'compress\.latency_mode' was renamed 'compress\.latency\.mode'"):
        _resolve(p)
    cfg = _resolve(TINY, "method=slimming", "compress.slimming_lambda=1")
    assert cfg["compress"]["slimming_lambda"] == 1.0
    assert _resolve(TINY, "compress.latency.mode=average")["compress"]["latency"] == {
        "estimate": True, "aware": False, "batch": 1, "mode": "average", "weights": None}


def test_switching_method_drops_the_other_methods_options_and_keeps_inherited_values(caplog):
    # a baseline config inherits EDP's λ from its base: accepted, not part of the baseline's config
    base = _resolve(CONFIGS / "voc07_frcnn_r50_fpn_baseline.yaml")
    assert base["method"] == "baseline" and "lambda_rank" not in base["compress"]
    assert base["compress"]["epoch_es"] == 8 and base["compress"]["flops_target"] == 0.4
    # ... and selecting EDP again on the command line gets the base's λ back, not the schema default
    again = _resolve(CONFIGS / "voc07_frcnn_r50_fpn_baseline.yaml", "method=edp")
    assert again["compress"]["lambda_rank"] == 0.0005 and again["compress"]["lambda_channel"] == 0.0005
    with caplog.at_level("INFO", logger="edp_det.runtime.config"):
        cfg = _resolve(TINY, "method=slimming")
    assert "lambda_rank" not in cfg["compress"] and cfg["compress"]["slimming_lambda"] == 1e-4
    assert "compress.lambda_rank" in caplog.text and "dropped" in caplog.text
    # the schema's Epoch_ES default, not a fallback of the method, when nothing sets it
    assert _resolve(None, "train.epochs=12")["compress"]["epoch_es"] == 6


def test_comparison_runs_other_methods_from_one_edp_config():
    from edp_det.harness.compare import comparison_config

    cfg = comparison_config(TINY, "l1_filter", 0.5, overrides=["compress.lambda_rank=5"])
    assert cfg["method"] == "l1_filter" and cfg["compress"]["flops_target"] == 0.5
    assert "lambda_rank" not in cfg["compress"] and cfg["compress"]["l1_normalize"] == "mean"
    edp = comparison_config(TINY, "edp", 0.6, overrides=["compress.lambda_rank=5"])
    assert edp["compress"]["lambda_rank"] == 5.0 and edp["compress"]["lambda_channel"] == 0.01


@pytest.mark.parametrize("override", [
    "train.batch_size=0", "train.num_workers=-1", "train.epochs=0", "train.log_interval=0", "train.eval_interval=-1",
    "train.max_iters_per_epoch=0", "train.checkpoint_keep=0", "train.threads=0", "eval.batch_size=0",
    "compress.bn_recalib_batches=-1", "compress.latency.batch=0", "compress.epoch_es=0", "compress.flops_target=1.5",
    "benchmark.iters=0", "model.min_size=0", "train.lr_schedule=linear", "seed=-1", "data.augment.seed=-2",
    "train.lr=.inf", "train.lr=1e400", "compress.lambda_rank=.inf", "data.augment.scale_jitter=[0.5,.inf]"])
def test_counts_and_choices_are_range_checked_at_load(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as ei:
        _resolve(TINY, override)
    assert f"'{key}'" in str(ei.value) and "command line" in str(ei.value)


@pytest.mark.parametrize("overrides,message", [
    (["device=tpu"], r"device='tpu' is not a device"),
    (["benchmark.device=tpu0", "benchmark.enabled=true"], r"benchmark\.device='tpu0' is not a device"),
    (["model.flops_input_size=[64]"], r"model\.flops_input_size=\[64\] must be \[H, W\]"),
    (["model.flops_input_size=[64,64,64]"], r"must be \[H, W\]"),
    (["train.lr_steps=[5,2]"], r"train\.lr_steps=\[5, 2\] must be increasing"),
    (["train.lr_steps=[0]"], r"train\.lr_steps=\[0\] must be increasing epochs ≥ 1"),
    (["model.min_size=200", "model.max_size=96"], r"model\.min_size=200 is larger than model\.max_size=96"),
    (["model.anchor_sizes=[0,0,0,0,0]"], r"model\.anchor_sizes=\[0, 0, 0, 0, 0\]: every anchor size"),
    (["model.weights=a.pt", "model.weights_backbone=b.pth"],
     r"model\.weights and model\.weights_backbone are both set"),
])
def test_values_used_late_are_checked_at_resolution(overrides, message):
    """Values that only the data loader, the final benchmark or the FLOPs count would have used fail before
    anything is built (a run would otherwise train and then lose its result)."""
    with pytest.raises(ConfigError, match=message) as ei:
        _resolve(TINY, *overrides)
    assert len(str(ei.value).splitlines()) == 1


def test_the_output_folder_is_never_inside_the_dataset(tmp_path):
    data = tmp_path / "voc"
    for out in (data, data / "runs" / "x"):
        with pytest.raises(ConfigError, match="inside data.root"):
            _resolve(TINY, data_root=data, output_dir=out)
    assert _resolve(TINY, data_root=data, output_dir=tmp_path / "runs")["output_dir"] == str(tmp_path / "runs")


def test_cuda_devices_need_cuda_when_the_run_starts(tmp_path):
    """A CUDA device name resolves anywhere (``--print-config``, a grid's report on another machine); the run
    refuses it at its start, before the data, the model or its folder are touched, also for the final benchmark."""
    import torch

    from edp_det.train.detection import DetectionTask
    from edp_det.train.engine import Trainer

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    for overrides, key in ((["device=cuda"], "device"),
                           (["benchmark.device=cuda:1", "benchmark.enabled=true"], "benchmark.device")):
        cfg = _resolve(TINY, *overrides, data_root=tmp_path / "missing", output_dir=out)
        with pytest.raises(ConfigError, match=f"^{key}='cuda(:1)?': CUDA is not available"):
            Trainer(cfg, DetectionTask(cfg), out).setup()
        assert not out.exists()
    # a benchmark that does not run needs no device
    cfg = _resolve(TINY, "benchmark.device=cuda", "benchmark.enabled=false")
    assert cfg["benchmark"]["device"] == "cuda"


@pytest.mark.parametrize("overrides,key,why", [
    (["method=baseline", "compress.flops_target=0.5"], "compress.flops_target", "method=baseline compresses nothing"),
    (["compress.schedule.lr=0.001"], "compress.schedule.lr", "compress.schedule.enabled is false"),
    (["compress.schedule.enabled=true", "train.epochs=9"], "train.epochs", "set compress.schedule.epochs"),
    (["compress.schedule.enabled=true", "compress.epoch_es=1"], "compress.epoch_es", "set compress.schedule.epoch_es"),
    (["train.optimizer=adamw", "train.momentum=0.5"], "train.momentum", "no momentum option"),
    (["train.lr_schedule=cosine", "train.lr_steps=[1]"], "train.lr_steps", "train.lr_schedule=cosine"),
    (["benchmark.enabled=false", "benchmark.iters=5"], "benchmark.iters", "benchmark.enabled is false"),
    (["compress.latency.batch=4"], "compress.latency.batch", "only with compress.group_weight=latency"),
])
def test_a_command_line_key_the_run_does_not_use_is_an_error(overrides, key, why):
    """On a tool's command line (``strict``) an override without effect is refused naming the key and the reason;
    the same keys are accepted where they take effect, and a harness sharing overrides across methods is lenient."""
    with pytest.raises(ConfigError, match=f"command line: {key} has no effect in this run .*{why}") as ei:
        _resolve(TINY, *overrides, strict=True)
    assert len(str(ei.value).splitlines()) == 1
    assert _resolve(TINY, *overrides)[key.split(".")[0]] is not None        # not strict: accepted


def test_command_line_keys_that_take_effect_are_accepted():
    for overrides in (["compress.schedule.enabled=true", "compress.schedule.lr=0.001", "compress.schedule.epochs=3"],
                      ["train.optimizer=sgd", "train.momentum=0.5"], ["train.lr_steps=[1]", "benchmark.iters=5"],
                      ["compress.group_weight=latency", "compress.latency.batch=4"],
                      ["compress.regularization=fixed", "compress.latency.aware=true"], ["method=baseline", "seed=3"]):
        _resolve(TINY, *overrides, strict=True)


def test_epoch_es_beyond_the_schedule_is_rejected_at_resolution():
    with pytest.raises(ValueError, match=r"compress\.epoch_es=5 must be in \[1, train\.epochs=3\]"):
        _resolve(TINY, "compress.epoch_es=5")


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_resume_is_a_flag_and_resume_from_takes_the_path(tmp_path):
    from edp_det.harness.cli import resume_argument

    parser = _tool("train_det").get_args_parser()
    args = parser.parse_args(["--config", str(TINY), "--resume", "train.threads=1"])
    assert args.overrides == ["train.threads=1"] and resume_argument(args) == "auto"
    args = parser.parse_args(["--config", str(TINY), "--resume-from", "ck.pt", "train.threads=1"])
    assert args.overrides == ["train.threads=1"] and resume_argument(args) == "ck.pt"
    assert resume_argument(parser.parse_args(["--config", str(TINY)])) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", str(TINY), "--resume", "--resume-from", "ck.pt"])


@pytest.mark.parametrize("tool, config", [("train_det", TINY), ("train_cls", CONFIGS / "tiny_imagefolder.yaml")])
def test_print_config_prints_the_resolved_config_with_help_and_builds_nothing(tool, config, tmp_path, capsys):
    from edp_det.harness.cli import cli_main

    mod = _tool(tool)
    out = tmp_path / "run"
    args = mod.get_args_parser().parse_args(["--config", str(config), "--output-dir", str(out), "--print-config",
                                             "method=slimming", "train.epochs=4"])
    with pytest.raises(SystemExit) as ei:
        cli_main(mod.main, args, tool)
    assert ei.value.code == 0
    text = capsys.readouterr().out
    assert "# images per process and step" in text and "slimming_lambda: 0.0001" in text
    printed = yaml.safe_load(text)
    assert printed["train"]["epochs"] == 4 and printed["method"] == "slimming"
    assert printed["output_dir"] == str(out) and not out.exists()


def test_bad_count_exits_2_with_one_line(tmp_path, capsys):
    from edp_det.harness.cli import cli_main

    mod = _tool("train_det")
    args = mod.get_args_parser().parse_args(["--config", str(TINY), "--output-dir", str(tmp_path / "r"),
                                             "train.batch_size=0"])
    with pytest.raises(SystemExit) as ei:
        cli_main(mod.main, args, "train_det")
    err = capsys.readouterr().err.strip()
    assert ei.value.code == 2 and len(err.splitlines()) == 1 and "'train.batch_size' = 0" in err


def test_config_reference_is_up_to_date():
    from edp_det.harness.run_config import config_reference

    text = config_reference()
    assert (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8") == text, \
        "docs/CONFIG.md is stale: python -m edp_det.harness.run_config --markdown > docs/CONFIG.md"
    for key in ("`train.batch_size`", "`compress.latency.aware`", "`compress.slimming_lambda`",
                "`data.augment.hflip`", "`data.check_images`", "`compress.admm_sparse_share`"):
        assert key in text
