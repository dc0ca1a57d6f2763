"""LoRA (peft) and gradient checkpointing in npo-tofu: the adapter-disabled model is θ_0, checkpointing
trains the adapters with the same loss, resume is bit-identical, no frozen copy is loaded, adapter
directories evaluate as their merged model, and bad LoRA input is one line.

Runs are 2-epoch ``npo-tofu unlearn`` of the session's fresh 1M tiny-llama on tofu-mini (40 forget
examples, batch 20, 96 tokens), in process, as tests/test_durability_tofu.py.
"""

from __future__ import annotations

import copy
import json
import shutil

import pandas as pd
import pytest
import torch

from full_scale import data as D
from full_scale.cli import main as cli
from full_scale.logprobs import sequence_logprobs
from full_scale.models import add_lora, enable_gradient_checkpointing, load_model, save_checkpoint
from full_scale.tasks import Reference, adapters_disabled

FAST = ["--no-progress", "--collapse-questions", "1", "--threads", "1"]
LORA = ["--lora-r", "4", "--lora-alpha", "16"]


def _argv(base, data, out, *extra, method="npo_kl"):
    return ["unlearn", "--preset", "mini", "--data-dir", str(data), "--model", str(base), "--method", method,
            "--out", str(out), "--epochs", "2", "--batch-size", "20", "--max-length", "96", *FAST, *LORA, *extra]


def _one_error_line(capfd) -> str:
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.fixture(scope="module")
def base_model(tiny_ckpt):
    return load_model(str(tiny_ckpt), device="cpu")


@pytest.fixture(scope="module")
def batch(base_model, tofu_data_dir):
    _, tok, fmt = base_model
    rows = D.load_split("forget10", tofu_data_dir)[:6]
    exs = D.encode_rows(tok, rows, D.get_format(fmt), 96)
    return D.pad_batch(exs, tok.pad_token_id)


def _lora_model(base_model, tiny_ckpt, checkpointing=False):
    model = copy.deepcopy(base_model[0])
    if checkpointing:
        enable_gradient_checkpointing(model, lora=True)
    lora = {"r": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    return add_lora(model, lora, base=str(tiny_ckpt), seed=0)


def _loss(model, b):
    lp, n = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
    return -(lp / n).mean()


def _lora_params(model):
    return {k: p for k, p in model.named_parameters() if "lora_" in k}


def test_adapter_disabled_reference_equals_frozen_copy(base_model, tiny_ckpt, batch):
    frozen = copy.deepcopy(base_model[0]).eval()
    model = _lora_model(base_model, tiny_ckpt)
    assert all(not p.requires_grad for k, p in model.named_parameters() if "lora_" not in k)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    _loss(model, batch).backward()
    opt.step()  # the adapters are non-zero now: the policy has moved away from θ_0
    with torch.no_grad():
        lp_policy = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        lp_frozen = sequence_logprobs(frozen, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        with adapters_disabled(model) as m:
            lp_base = sequence_logprobs(m, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
    assert model.training  # restored after the reference pass
    assert (lp_policy - lp_frozen).abs().max() > 1e-3
    assert torch.allclose(lp_base, lp_frozen, atol=1e-6, rtol=0)
    # what the micro-batches read: the same logits and log-likelihoods as a frozen copy
    ref_a, ref_f = Reference(model=model, adapter=True), Reference(model=frozen)
    assert torch.allclose(ref_a.logits(batch), ref_f.logits(batch), atol=1e-6, rtol=0)
    assert torch.allclose(ref_a.logp("logp_ref", [0], batch, "sum"), ref_f.logp("logp_ref", [0], batch, "sum"),
                          atol=1e-5, rtol=0)
    assert torch.allclose(ref_a.hidden(batch, 1), ref_f.hidden(batch, 1), atol=1e-6, rtol=0)


def test_gradient_checkpointing_trains_the_adapters_with_the_same_loss(base_model, tiny_ckpt, batch):
    plain, ckpt = _lora_model(base_model, tiny_ckpt), _lora_model(base_model, tiny_ckpt, checkpointing=True)
    assert ckpt.base_model.model.model.gradient_checkpointing or any(
        getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    before = {k: p.detach().clone() for k, p in _lora_params(ckpt).items()}
    losses = []
    for model in (plain, ckpt):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = _loss(model, batch)
        loss.backward()
        losses.append(float(loss.detach()))
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for k, p in _lora_params(model).items()
                   if "lora_B" in k), "adapters get no gradient"
        opt.step()
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    gp, gc = _lora_params(plain), _lora_params(ckpt)
    assert all(torch.allclose(gp[k], gc[k], atol=1e-6) for k in gp)
    assert all(not torch.equal(before[k], gc[k]) for k in gc)  # every adapter matrix moved


@pytest.fixture(scope="module")
def lora_run(tiny_ckpt, tofu_data_dir, tmp_path_factory):
    """An uninterrupted 2-epoch LoRA npo_kl run (uses the reference's retain logits)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    assert cli(_argv(tiny_ckpt, tofu_data_dir, out)) == 0
    return out


def test_npo_kl_with_lora_loads_no_frozen_copy(lora_run, tiny_ckpt):
    info = json.loads((lora_run / "run.json").read_text())
    assert info["ref"] == "adapter-disabled" and info["reference_model_loaded"] is False
    assert info["lora"] == {"r": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert info["n_parameters"] < info["n_parameters_total"] / 10  # only the adapters train
    cfg = json.loads((lora_run / "config.json").read_text())
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["merge_lora"]) == (4, 16.0, False)
    model_dir = lora_run / "model"
    assert (model_dir / "adapter_model.safetensors").is_file() and (model_dir / "adapter_config.json").is_file()
    assert not list(lora_run.rglob("*.bin")) and not (model_dir / "model.safetensors").exists()
    adapter_cfg = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_ckpt.resolve())
    log = pd.read_csv(lora_run / "train_log.csv")
    assert log["param_dist"].iloc[-1] > 0 and log["retain_nll"].notna().all()


def test_resume_with_lora_is_bit_identical(lora_run, tiny_ckpt, tofu_data_dir, tmp_path):
    out = tmp_path / "run"
    assert cli(_argv(tiny_ckpt, tofu_data_dir, out, "--stop-after-epoch", "1")) == 0
    assert (out / "checkpoints" / "epoch-1" / "adapter_model.safetensors").is_file()
    assert not (out / "model").exists()
    assert cli(_argv(tiny_ckpt, tofu_data_dir, out, "--resume")) == 0
    for name in ("model/adapter_model.safetensors", "train_log.csv", "run.json", "ref_cache.safetensors"):
        assert (out / name).read_bytes() == (lora_run / name).read_bytes(), name


def test_eval_of_an_adapter_dir_equals_eval_of_its_merged_model(lora_run, tofu_data_dir, tmp_path, capfd):
    merged = tmp_path / "merged"
    model, tok, fmt = load_model(str(lora_run / "model"), device="cpu")  # the base + adapters, merged
    save_checkpoint(model, tok, merged, {"prompt_format": fmt})
    summaries = []
    for name, src in (("adapter", lora_run), ("merged", merged)):  # a run dir stands for its model/
        argv = ["eval", "--model", str(src), "--forget-split", "mini-forget10", "--data-dir", str(tofu_data_dir),
                "--out", str(tmp_path / name), "--ds-size", "2", "--max-new-tokens", "4", "--no-extra-metrics",
                "--threads", "1"]
        assert cli(argv) == 0
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    a, m = summaries
    for key in ("model_utility", "forget_rouge"):
        assert a[key] == m[key], key
    assert (tmp_path / "adapter" / "eval_log_aggregated.json").read_bytes() == \
        (tmp_path / "merged" / "eval_log_aggregated.json").read_bytes()
    # an adapter dir whose base is gone: one line, exit 2, nothing written
    orphan = tmp_path / "orphan"
    shutil.copytree(lora_run / "model", orphan)
    acfg = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**acfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    capfd.readouterr()
    assert cli(["eval", "--model", str(orphan), "--forget-split", "mini-forget10", "--data-dir", str(tofu_data_dir),
                "--out", str(tmp_path / "e3")]) == 2
    assert "base model" in _one_error_line(capfd) and not (tmp_path / "e3").exists()


@pytest.mark.parametrize("extra, words", [
    (["--lora-r", "0"], "lora_r must be an integer ≥ 1"),
    (["--lora-r", "-2"], "lora_r must be an integer ≥ 1"),
    (["--lora-targets", "q_proj,not_a_module"], "no module named 'not_a_module'"),
])
def test_bad_lora_input_is_one_line_and_writes_nothing(tiny_ckpt, tofu_data_dir, tmp_path, capfd, extra, words):
    out = tmp_path / "run"
    capfd.readouterr()
    assert cli(_argv(tiny_ckpt, tofu_data_dir, out, *extra, method="npo")) == 2
    assert words in _one_error_line(capfd)
    assert not out.exists()


def test_lora_without_a_retain_term_skips_the_retain_pass(tiny_ckpt, tofu_data_dir, tmp_path):
    """GA reads no retain input: no per-step retain forward; the collapse check uses the epoch-end monitor NLL.
    With --gradient-checkpointing and --merge-lora the final model/ is a plain HF model."""
    out = tmp_path / "ga"
    assert cli(_argv(tiny_ckpt, tofu_data_dir, out, "--gradient-checkpointing", "--merge-lora", "--epochs", "1",
                     method="ga")) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["retain_pass"].startswith("epoch end") and info["gradient_checkpointing"] and info["ref"] is None
    log = pd.read_csv(out / "train_log.csv")
    assert log["retain_nll"].isna().all() and log["retain_nll_monitor"].notna().iloc[-1]
    assert (out / "model" / "model.safetensors").is_file() and not (out / "model" / "adapter_config.json").exists()
    merged = load_model(str(out), device="cpu")[0]
    base = load_model(str(tiny_ckpt), device="cpu")[0]
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))
