"""A run cannot end half-done or resume the wrong thing: Ctrl-C mid-epoch, a kill during the final save,
a moved run directory, and the same seed twice (byte-identical results).

Every run is a 2-epoch ``npo-tofu unlearn`` of a fresh 1M tiny-llama on tofu-mini (40 forget examples,
batch 20: 2 steps per epoch, sequences cut at 96 tokens), in process; only the real-SIGINT test starts a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from full_scale import checkpoint as ckpt_mod
from full_scale import tasks as tasks_mod
from full_scale.cli import main as cli

FAST = ["--no-progress", "--collapse-questions", "1", "--threads", "1"]
#: what the same seed reproduces byte for byte (timings live in timing.json; checkpoints' state.json
#: keeps the reference cache's seconds for timing.json after a resume)
IDENTICAL = ("config.json", "run.json", "train_log.csv", "greedy_samples.json", "ref_cache.safetensors",
             "model/config.json", "model/generation_config.json", "model/model.safetensors", "model/npo_sim.json",
             "model/tokenizer.json", "model/tokenizer_config.json")


def _argv(base, data, out, *extra):
    return ["unlearn", "--preset", "mini", "--data-dir", str(data), "--model", str(base), "--method", "npo_rt",
            "--out", str(out), "--epochs", "2", "--batch-size", "20", "--max-length", "96", *FAST, *extra]


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tofu_data_dir, tmp_path_factory):
    """An uninterrupted run, made at ROOT/same/run and then moved to ROOT/ref/run (so that a second run
    at the same path can be compared byte for byte)."""
    root = tmp_path_factory.mktemp("durability")
    assert cli(_argv(tiny_ckpt, tofu_data_dir, root / "same" / "run")) == 0
    shutil.move(root / "same", root / "ref")
    return root, root / "ref" / "run"


def _same_weights(a: Path, b: Path) -> bool:
    return (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()


def _one_error_line(capfd) -> str:
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_interrupt_mid_epoch_then_resume_is_bit_identical(reference, tiny_ckpt, tofu_data_dir, tmp_path, capfd,
                                                          monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in the middle of epoch 2, after the epoch-1 checkpoint: one line, exit 130;
    --resume then gives bit-identical weights and the same train log as the uninterrupted run."""
    _, ref = reference
    after_step = tasks_mod.UnlearnTask.after_step

    def interrupt_at_3(self, s, row):
        if row["step"] == 3:  # the first step of epoch 2 (2 steps per epoch)
            raise KeyboardInterrupt
        return after_step(self, s, row)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(tasks_mod.UnlearnTask, "after_step", interrupt_at_3)
        capfd.readouterr()
        assert cli(_argv(tiny_ckpt, tofu_data_dir, out)) == 130
    assert _one_error_line(capfd) == "npo-tofu unlearn: error: interrupted at step 3; continue with --resume"
    assert len(pd.read_csv(out / "train_log.csv")) == 2 and not (out / "model").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-1"]  # complete checkpoints only
    assert cli(_argv(tiny_ckpt, tofu_data_dir, out, "--resume")) == 0
    assert _same_weights(out, ref)
    assert (out / "train_log.csv").read_bytes() == (ref / "train_log.csv").read_bytes()


def test_real_sigint_is_one_line_and_exit_130(tiny_ckpt, tofu_data_dir, tmp_path):
    """A real SIGINT to the process, once the train log shows a step: one stderr line, exit 130, a valid run dir."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPO_DEBUG": ""}
    cmd = [sys.executable, "-m", "full_scale.cli", *_argv(tiny_ckpt, tofu_data_dir, out)]
    cmd[cmd.index("--epochs") + 1] = "200"  # far more than can finish before the signal
    # SIGINT back to its default in the child: a test run started in the background (bash `&`) inherits
    # SIG_IGN, and Python then installs no KeyboardInterrupt handler, so the signal would be ignored
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (out / "train_log.csv").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("npo-tofu unlearn: error: interrupted at step ")
    assert lines[0].endswith("; continue with --resume")
    assert len(pd.read_csv(out / "train_log.csv")) >= 1 and json.loads((out / "config.json").read_text())
    assert not list(out.glob(".*.tmp")) and not (out / "model").exists()


def test_kill_during_final_save_leaves_no_half_written_model(reference, tiny_ckpt, tofu_data_dir, tmp_path, capfd,
                                                             monkeypatch):
    """Killed after the final weights are written but before the tokenizer: no model/ at all (not one
    without a tokenizer); --resume then writes the complete model, identical to the uninterrupted one."""
    _, ref = reference
    real = ckpt_mod.save_checkpoint

    def killed_after_weights(model, tokenizer, out_dir, extra=None, **kw):
        if Path(out_dir).name != ".model.tmp":  # epoch checkpoints as usual
            return real(model, tokenizer, out_dir, extra, **kw)
        model.save_pretrained(out_dir, state_dict=kw.get("state_dict"))  # the weights, then the kill
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(ckpt_mod, "save_checkpoint", killed_after_weights)
        capfd.readouterr()
        assert cli(_argv(tiny_ckpt, tofu_data_dir, out)) == 130
    assert _one_error_line(capfd) == "npo-tofu unlearn: error: interrupted at step 4; continue with --resume"
    assert not (out / "model").exists()
    assert (out / ".model.tmp" / "model.safetensors").is_file()  # what a kill -9 would leave: hidden, ignored
    assert cli(_argv(tiny_ckpt, tofu_data_dir, out, "--resume")) == 0
    assert not (out / ".model.tmp").exists()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "npo_sim.json", "config.json"):
        assert (out / "model" / name).is_file(), name
    assert _same_weights(out, ref)
    umask = os.umask(0)
    os.umask(umask)
    for f in (out / "model" / "model.safetensors", out / "ref_cache.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f  # not safetensors' 0600


def test_moved_run_dir_resumes_to_the_same_result(reference, tiny_ckpt, tofu_data_dir, tmp_path):
    _, ref = reference
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    assert cli(_argv(tiny_ckpt, tofu_data_dir, a, "--stop-after-epoch", "1")) == 0
    b.parent.mkdir()
    shutil.move(a, b)
    assert cli(_argv(tiny_ckpt, tofu_data_dir, b, "--resume")) == 0
    assert _same_weights(b, ref)
    assert (b / "train_log.csv").read_bytes() == (ref / "train_log.csv").read_bytes()
    assert json.loads((b / "config.json").read_text())["out"] == str(b)


def test_same_seed_twice_gives_byte_identical_results(reference, tiny_ckpt, tofu_data_dir):
    root, ref = reference
    again = root / "same" / "run"  # the first run's own path: config.json records it
    assert cli(_argv(tiny_ckpt, tofu_data_dir, again)) == 0
    for name in IDENTICAL:
        assert (again / name).read_bytes() == (ref / name).read_bytes(), name
    timing = json.loads((again / "timing.json").read_text())
    assert {"train_seconds", "tokens_per_second", "peak_rss_mb", "step_seconds"} <= set(timing)
    assert "step_seconds" not in pd.read_csv(again / "train_log.csv").columns


def test_interrupted_write_leaves_no_temporary_file(tiny_ckpt, tofu_data_dir, tmp_path, capfd, monkeypatch):
    """Ctrl-C while npo-tofu eval writes eval_log_aggregated.json: exit 130, no .eval_log_aggregated.json.*.tmp."""
    import npo_sim.runio as runio

    real = runio.os.replace

    def interrupted(src, dst):
        if Path(dst).name == "eval_log_aggregated.json":
            raise KeyboardInterrupt
        return real(src, dst)

    out = tmp_path / "ev"
    argv = ["eval", "--model", str(tiny_ckpt), "--forget-split", "mini-forget10", "--data-dir", str(tofu_data_dir),
            "--ds-size", "2", "--max-new-tokens", "2", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(runio.os, "replace", interrupted)
        capfd.readouterr()
        assert cli(argv) == 130
    assert _one_error_line(capfd) == "npo-tofu eval: error: interrupted"
    assert list(out.iterdir()) == []
