"""Shared pytest fixtures (CPU only, nothing downloads)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory) -> Path:
    """A tiny synthetic VOC dataset (12 trainval / 6 test images, 128 px, seed 0); returns its root
    (holding Annotations/, JPEGImages/, ImageSets/Main/). Shared by the session: treat it as
    read-only and copy it (``shutil.copytree``) before modifying anything."""
    from edp_det.data.synthetic import make_synthetic_voc

    root = tmp_path_factory.mktemp("synthetic_voc")
    make_synthetic_voc(root, num_train=12, num_test=6, image_size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def raccoon_root() -> Path:
    """The real raccoon VOC dataset next to the repo (``../shared/data/raccoon``); skipped if absent.
    Read it in place, never copy it into the repo."""
    root = REPO_ROOT.parent / "shared" / "data" / "raccoon"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"raccoon dataset not found at {root}")
    return root


@pytest.fixture(scope="session", autouse=True)
def image_check_cache_dir(tmp_path_factory) -> Path:
    """Image-check verdicts (edp_det.data.imagecheck) go to a session temporary folder, also for tools
    run as subprocesses, never to the user's cache folder."""
    d = tmp_path_factory.mktemp("edp_det_cache")
    old = os.environ.get("EDP_DET_CACHE_DIR")
    os.environ["EDP_DET_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("EDP_DET_CACHE_DIR", None)
    else:
        os.environ["EDP_DET_CACHE_DIR"] = old


@pytest.fixture()
def restore_logging():
    """The tools install root-logger handlers (stderr + <out>/log.txt); put the previous ones back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
