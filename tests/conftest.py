"""Shared fixtures. TOFU data is read from ../shared/tofu (or $NPO_TOFU_DIR), never copied here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _tofu_root() -> Path:
    env = os.environ.get("NPO_TOFU_DIR")
    data = Path(env) if env else REPO.parent / "shared" / "tofu" / "data"
    return data


@pytest.fixture(scope="session")
def tofu_data_dir() -> Path:
    d = _tofu_root()
    if not (d / "full.json").exists():
        pytest.fail(f"TOFU data not found at {d}: put ../shared/tofu beside the repo or set NPO_TOFU_DIR")
    return d


@pytest.fixture(scope="session")
def tofu_reference_logs(tofu_data_dir) -> Path:
    d = tofu_data_dir.parent / "reference_logs"
    if not d.is_dir():
        pytest.fail(f"TOFU reference logs not found at {d}")
    return d


def _test_threads() -> int:
    """Torch threads per test process: the cores shared among pytest-xdist workers (make test runs 2 workers
    on 2 cores: 1 thread each), since oversubscribing the cores slows everything 4-8x."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, os.cpu_count() or 1) // workers)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(_test_threads())
    yield


@pytest.fixture(scope="session")
def tiny_ckpt(tofu_data_dir, tmp_path_factory) -> Path:
    """A freshly initialised 1M tiny-llama saved as a checkpoint (built once per session, never trained)."""
    from full_scale.models import load_model, save_checkpoint

    d = tmp_path_factory.mktemp("tiny_ckpt")
    model, tok, fmt = load_model("tiny-llama:1m", device="cpu", data_dir=tofu_data_dir, seed=0)
    save_checkpoint(model, tok, d, {"prompt_format": fmt})
    return d

