import json
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edp_det.runtime import distributed as D
from edp_det.runtime.errors import ConfigError

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for var in DIST_ENV:
        monkeypatch.delenv(var, raising=False)


def test_single_process_noops(clean_env):
    info = D.init_distributed(device="cpu")
    assert info == D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    assert info.is_main and not dist.is_initialized()
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process() and not D.is_distributed()
    D.barrier()
    t = torch.tensor([1, 2, 3])
    m = D.all_reduce_mean(t)
    assert m.dtype.is_floating_point and torch.equal(m, t.double()) and m is not t
    obj = {"a": [1, 2]}
    assert D.broadcast_object(obj) is obj
    assert D.all_gather_object(obj) == [obj]
    assert D.reduce_dict({"loss": torch.tensor(0.5), "n": 3}) == {"loss": 0.5, "n": 3.0}
    with pytest.raises(ValueError, match="'x'"):
        D.reduce_dict({"x": torch.ones(2)})
    assert D.check_params_identical(torch.nn.Linear(2, 2))
    D.destroy()


def test_env_parsing(clean_env, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not D.init_distributed(device="cpu").distributed
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        D.init_distributed(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2"):
        D.init_distributed(device="cpu")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        D.init_distributed(device="cpu")


def test_seed_everything_reproducible_and_rank_offset():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    assert D.seed_everything(5) == 5
    a = draw()
    D.seed_everything(5)
    assert draw() == a
    assert D.seed_everything(5, rank=1) == 6
    assert draw() != a


def test_param_checksums_detect_small_changes():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    c1 = D.param_checksums(m)
    assert set(c1) == {"param:0.weight", "param:0.bias", "param:1.weight", "param:1.bias",
                       "buffer:1.running_mean", "buffer:1.running_var", "buffer:1.num_batches_tracked"}
    with torch.no_grad():  # swap two entries: sum and sum of squares unchanged, weighted sum changes
        w = m[0].weight
        w[0, 0], w[0, 1] = w[0, 1].clone(), w[0, 0].clone()
    assert D.param_checksums(m)["param:0.weight"] != c1["param:0.weight"]


# ------------------------------------------------------------------------------------ 2-process gloo
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = D.init_distributed(backend="gloo", device="cpu", timeout_s=60)
    try:
        res = {"info": [info.rank, info.world_size, info.local_rank, str(info.device), info.distributed,
                        info.backend]}
        res["rank_fns"] = [D.get_rank(), D.get_world_size(), D.is_main_process(), D.is_distributed()]
        # all_reduce_mean: ranks hold [1, 2] and [3, 4] → [2, 3]; input untouched
        t = torch.tensor([1.0, 2.0]) + 2 * rank
        res["mean"] = D.all_reduce_mean(t).tolist()
        res["input_after"] = t.tolist()
        res["mean_int"] = D.all_reduce_mean(torch.tensor([rank])).tolist()
        # broadcast_object from rank 0 and from rank 1
        res["bcast0"] = D.broadcast_object({"from": rank, "cfg": [1, 2]} if rank == 0 else None)
        res["bcast1"] = D.broadcast_object(f"hello from {rank}", src=1)
        res["gather"] = D.all_gather_object(rank * 10)
        res["reduced"] = D.reduce_dict({"loss": float(rank), "acc": torch.tensor(0.5 + rank)})
        # identical models (same seed) agree; perturbing one rank's buffer/param is detected on every rank
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
        res["identical"] = D.check_params_identical(model)
        if rank == 1:
            with torch.no_grad():
                model[0].weight[0, 0, 0, 0] += 1e-6
        res["after_param_perturb"] = D.check_params_identical(model)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
        if rank == 0:
            model[1].running_mean += 0.5
        res["after_buffer_perturb"] = D.check_params_identical(model)
        D.barrier()
    finally:
        D.destroy()
    res["destroyed"] = not dist.is_initialized()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def test_two_process_gloo(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no dependence on the host's network set-up
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["info"] == [rank, 2, rank, "cpu", True, "gloo"]
        assert res["rank_fns"] == [rank, 2, rank == 0, True]
        assert res["mean"] == [2.0, 3.0]
        assert res["input_after"] == [1.0 + 2 * rank, 2.0 + 2 * rank]
        assert res["mean_int"] == [0.5]
        assert res["bcast0"] == {"from": 0, "cfg": [1, 2]}
        assert res["bcast1"] == "hello from 1"
        assert res["gather"] == [0, 10]
        assert res["reduced"] == {"acc": 1.0, "loss": 0.5}
        assert res["identical"] is True
        assert res["after_param_perturb"] is False
        assert res["after_buffer_perturb"] is False
        assert res["destroyed"] is True
