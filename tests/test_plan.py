"""``npo-tofu plan``: the planner's formulas on a hand-sized config, LoRA counts against peft, parameter counts
of the built-in configs against transformers, sharding, the reference rules, and one-line bad input.
No model is loaded beyond configs (the built-in 7B/1.3B models are built on the meta device)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from full_scale import plan as P
from full_scale.cli import main as cli

#: a hand-sized Llama: vocab 100, hidden 8, intermediate 16, 2 layers, 2 heads (kv = 8), untied
HAND = {"model_type": "llama", "vocab_size": 100, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": False}


@pytest.fixture
def hand_config(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(HAND))
    return f


def test_hand_sized_config_matches_hand_arithmetic(hand_config):
    arch = P.load_arch(str(hand_config))
    # P = V·h + L·(2h² + 2h·kv + 3h·i + 2h) + h + V·h = 800 + 2·(128 + 128 + 384 + 16) + 8 + 800 = 2920
    assert P.parameter_count(arch) == 800 + 2 * (128 + 128 + 384 + 16) + 8 + 800 == 2920
    # N = P − V·h (the input embedding is a lookup) = 2120
    assert P.matmul_parameters(arch) == 2120
    req = P.PlanRequest(model=str(hand_config), method="npo", batch_size=2, grad_accum=1, seq_len=4, dtype="fp32",
                        ref_mode="cached", accelerate="single_gpu", device="cpu", overhead_mb=0.0, forget="forget10")
    p = P.make_plan(req)
    parts = p.memory.parts
    assert parts["parameters"] == 2920 * 4 == 11680
    assert parts["gradients"] == 11680
    assert parts["optimizer"] == 2920 * 8 == 23360          # fp32: AdamW m, v; no master copy
    assert parts["theta0 snapshot"] == 11680
    assert parts["reference copy"] == 0                      # npo + cached: no frozen copy
    assert parts["reference cache"] == 400 * 4 == 1600       # forget10: 400 fp32 logp_ref values
    # activations: one stream with gradients (forget, B·T = 8 tokens); npo reads no retain input, so the retain
    # batch is not forwarded (it is, without gradients, under --stop-on-collapse: below)
    # per token and layer (fp32, full): attention 6h + 2kv = 64, MLP 3h + 4i = 88 -> 152 elements, 608 bytes
    body = 8 * 2 * 152 * 4                                   # 9728
    logits = 8 * 100 * (4 + 8)                               # 9600: logits + fp32 copy + log-softmax
    transient = 8 * 8 * 100                                  # 6400: fp32 grads of the logits and log-softmax
    assert parts["activations"] == body + logits + transient == 25728
    assert parts["runtime overhead"] == 0
    # accumulation 1: the gradients are allocated as the activations free, so only the larger counts
    assert parts["grad/act overlap"] == -min(25728, 11680) == -11680
    # parameters + gradients + optimizer + snapshot + activations + cache − overlap
    assert p.memory.training == 11680 + 11680 + 23360 + 11680 + 25728 + 1600 - 11680 == 74048
    assert p.memory.load_peak == 11680 + 11680                # model + snapshot, no copy
    assert p.memory.total == p.memory.training
    # FLOPs/token: attention 4·L·T·h = 256; forget 6N + 3·256 = 13488
    assert p.flops.per_token == 6 * 2120 + 3 * 256 == 13488
    assert p.flops.per_epoch == 13488 * 400 * 4
    assert p.flops.cache == 400 * 4 * (2 * 2120 + 256)       # one forward over the forget set, once
    assert p.flops.steps_per_epoch == 200 and p.flops.tokens_per_step == 8
    # --stop-on-collapse: the retain batch is forwarded without gradients every step: its logits
    # (8 · 100 · (4 + 8) = 9600 bytes) and one forward, 2N + 256 = 4496 FLOPs/token
    q = P.make_plan(dataclasses.replace(req, stop_on_collapse=True))
    assert q.memory.parts["activations"] == 25728 + 9600
    assert q.flops.per_token == 13488 + 4496


def test_frozen_copy_kl_and_lora_rules(hand_config):
    base = dict(model=str(hand_config), batch_size=2, grad_accum=1, seq_len=4, dtype="fp32", device="cpu",
                overhead_mb=0.0)
    npo_model = P.make_plan(P.PlanRequest(method="npo", ref_mode="model", **base))
    assert npo_model.streams.ref_kind == "model" and npo_model.memory.parts["reference copy"] == 2920 * 4
    assert npo_model.memory.parts["reference cache"] == 0
    # one extra forward of the forget stream through the reference: + (2N + attn)
    npo_cached = P.make_plan(P.PlanRequest(method="npo", ref_mode="cached", **base))
    assert npo_model.flops.per_token - npo_cached.flops.per_token == 2 * 2120 + 256
    kl = P.make_plan(P.PlanRequest(method="npo_kl", ref_mode="cached", **base))
    assert kl.streams.ref_kind == "model" and kl.streams.cached == ("logp_ref",)   # retain logits need the model
    assert kl.streams.grad == ("forget", "retain") and kl.streams.reference == ("retain",)
    kl_lora = P.make_plan(P.PlanRequest(method="npo_kl", lora=True, lora_r=2, **base))
    assert kl_lora.streams.ref_kind == "adapter-disabled" and kl_lora.memory.parts["reference copy"] == 0
    n_lora = 2 * 2 * (4 * (8 + 8))   # L · r · Σ(in + out) over q, k, v, o (npo-tofu's default targets)
    assert kl_lora.trainable == n_lora == P.lora_parameters(kl_lora.arch, 2, None)
    assert kl_lora.memory.parts["optimizer"] == n_lora * 8
    # LoRA backward: 4N + 6·N_lora per token and stream with gradients (no weight gradients of the base)
    attn = 256
    assert kl_lora.flops.per_token == 2 * (4 * 2120 + 6 * n_lora + 3 * attn) + (2 * 2120 + attn)
    ref_free = P.make_plan(P.PlanRequest(method="simnpo", **base))
    assert ref_free.streams.ref_kind == "none" and ref_free.memory.parts["reference cache"] == 0


def test_sharding_divides_by_process_count(hand_config):
    base = dict(model=str(hand_config), method="npo_kl", batch_size=2, grad_accum=1, seq_len=4, dtype="bf16",
                device="gpu", overhead_mb=0.0)
    single = P.make_plan(P.PlanRequest(accelerate="single_gpu", **base)).memory.parts
    ddp = P.make_plan(P.PlanRequest(accelerate="ddp", processes=4, **base)).memory.parts
    for name in ("fsdp", "deepspeed_zero3"):
        sharded = P.make_plan(P.PlanRequest(accelerate=name, processes=4, **base)).memory.parts
        for k in ("parameters", "gradients", "optimizer", "reference copy", "theta0 snapshot"):
            assert sharded[k] == pytest.approx(single[k] / 4), (name, k)
            assert ddp[k] == single[k]
        assert sharded["activations"] == single["activations"]   # per-device micro-batch
    assert P.read_accelerate("fsdp").processes == 8 and P.read_accelerate("single_gpu").sharding == "none"
    # bf16 mixed: 2 (weights) + 2 (grads) + 4 (fp32 master) + 8 (fp32 moments) bytes per trainable parameter
    assert (single["parameters"] + single["gradients"] + single["optimizer"]) == 2920 * 16


def _tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False, **kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("all-linear",)])
def test_lora_count_equals_peft(targets):
    peft = pytest.importorskip("peft")
    model = _tiny_llama()   # GQA: k/v project 16 -> 8
    arch = P.Arch.from_config("tiny", model.config.to_dict())
    assert P.parameter_count(arch) == sum(p.numel() for p in model.parameters())
    modules = "all-linear" if targets == ("all-linear",) else list(targets)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules)
    pm = peft.get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert P.lora_parameters(arch, 4, targets) == trainable


@pytest.mark.parametrize("name", list(P.BUILTIN_CONFIGS))
def test_builtin_configs_count_like_transformers(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(P.BUILTIN_CONFIGS[name])
    model_type = cfg.pop("model_type")
    conf = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    arch = P.load_arch(name)
    assert P.parameter_count(arch) == sum(p.numel() for p in model.parameters())
    assert P.parameter_count(arch) == {"microsoft/phi-1_5": 1_418_270_720}.get(name, 6_738_415_616)


def test_split_sizes_and_recipe():
    assert [P.split_examples(s) for s in ("forget01", "forget05", "forget10", "retain90", "full")] == \
        [40, 200, 400, 3600, 4000]
    assert P.split_examples("mini-forget10", "mini") == 40
    p = P.make_plan(P.PlanRequest(method="npo_kl", **P.RECIPES["paper-llama2-7b"]))
    assert p.arch_params == 6_738_415_616 and p.flops.steps_per_epoch == 13 and p.flops.tokens_per_step == 32 * 500
    rows = P.fits_table(p.request)
    assert {r["setup"] for r in rows} == {"1x80GB", "2x40GB", "8x24GB"}
    single = {r["mode"]: r for r in rows if r["launcher"] == "single_gpu"}
    assert not single["full"]["fits"] and single["lora"]["fits"]   # 7B full AdamW + frozen copy > 80 GB


def test_cli_prints_plan(capsys, hand_config):
    assert cli(["plan", "--model", str(hand_config), "--method", "npo_rt", "--seq-len", "16", "--lora-r", "2",
                "--fits"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATED PEAK" in out and "LoRA r=2" in out and "8x24GB" in out
    assert cli(["plan", "--recipe", "paper-llama2-7b", "--method", "npo", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"] == 6_738_415_616 and d["fits"]


BAD = {
    "unknown model": (["--model", "no/such-model", "--method", "npo"], "unknown model"),
    "unknown method": (["--model", "tiny-llama:1m", "--method", "nope"], "unknown method"),
    "bad accelerate path": (["--model", "tiny-llama:1m", "--method", "npo", "--accelerate", "/no/such.yaml"],
                            "accelerate config not found"),
    "non-positive batch": (["--model", "tiny-llama:1m", "--method", "npo", "--batch-size", "0"], "batch-size"),
    "non-positive accum": (["--model", "tiny-llama:1m", "--method", "npo", "--grad-accum", "-1"], "grad-accum"),
    "bad lora rank": (["--model", "tiny-llama:1m", "--method", "npo", "--lora-r", "0"], "lora-r"),
    "unknown tiny size": (["--model", "tiny-llama:3m", "--method", "npo"], "tiny-llama size"),
    "no model": (["--method", "npo"], "--model is required"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case, capfd, monkeypatch):
    monkeypatch.delenv("NPO_DEBUG", raising=False)
    argv, msg = BAD[case]
    capfd.readouterr()
    rc = cli(["plan", *argv])
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, (case, err)
    assert lines[0].startswith("npo-tofu plan: error: ") and msg in lines[0], (case, lines[0])
    assert "Traceback" not in err + out and not out


def test_bad_config_json_is_one_line(tmp_path, capfd):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    rc = cli(["plan", "--model", str(tmp_path), "--method", "npo"])
    err = capfd.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "not supported by the planner" in err
    (tmp_path / "y.yaml").write_text("just: [a list\n")
    rc = cli(["plan", "--model", "tiny-llama:1m", "--method", "npo", "--accelerate", str(tmp_path / "y.yaml")])
    err = capfd.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "accelerate" in err
