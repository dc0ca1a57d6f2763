"""``npo-tofu plan``: peak memory per device, FLOPs, tokens and time of an unlearning run, before running it.

Nothing here loads a model: the planner reads a model's ``config.json`` (a file, a local model or run
directory, a tiny-llama size, or one of :data:`BUILTIN_CONFIGS`, the published configs of the paper's
models), the objective's inputs from the registry (:mod:`npo_sim.losses`: ``needs``,
``uses_reference``, ``needs_ref_logits``), and an accelerate config (:data:`ACCELERATE_DIR`). Every
number is one of the explicit functions below; the README section "Planning memory and time" writes
them out. They describe *this* training loop (:mod:`full_scale.train`, :mod:`full_scale.tasks`):

* a micro-batch runs the forget stream, the retain stream when the objective reads it (or
  ``--stop-on-collapse`` needs its NLL every step) and, for IDK objectives, the IDK stream; each with
  gradients when the objective reads it, else without;
* the reference is a frozen copy of θ_0 when the objective needs reference logits/activations or
  ``ref_mode="model"`` (:class:`full_scale.tasks.ReferenceSource`), else per-example log-probs cached
  once before training; with LoRA it is the base model with the adapters disabled (no copy);
* ``train.run`` keeps a snapshot of the trainable parameters at θ_0 for the logged ``param_dist``:
  before ``accelerate.prepare`` in single-device and DDP runs, each rank's shard after it under FSDP/ZeRO-3.
* memory is what the formulas count, with no fitted factor: on the CPU the measured process peak is
  7-20 % above it (``bench/results/memory.json``), glibc's allocator holding freed blocks between steps.

Bytes are decimal-free: 1 MB = 2**20 bytes, 1 GB = 2**30 bytes (what ``nvidia-smi`` and ``ru_maxrss``
report as MiB/GiB).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from npo_sim.runio import UserError

from .data import MINI_FORGET_AUTHORS

MB = 2 ** 20
GB = 2 ** 30
ACCELERATE_DIR = Path(__file__).resolve().parent / "accelerate"

# --------------------------------------------------------------------------------------------------
# models: the published configs (no internet), tiny-llama, config.json files
# --------------------------------------------------------------------------------------------------
_LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
}
#: the published ``config.json`` of the paper's models (hub revisions of 2024; 6,738,415,616 and
#: 1,418,270,720 parameters)
BUILTIN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": {**_LLAMA2_7B, "_name_or_path": "meta-llama/Llama-2-7b-hf",
                                 "transformers_version": "4.31.0.dev0"},
    "meta-llama/Llama-2-7b-chat-hf": {**_LLAMA2_7B, "_name_or_path": "meta-llama/Llama-2-7b-chat-hf",
                                      "transformers_version": "4.32.0.dev0"},
    "microsoft/phi-1_5": {
        "_name_or_path": "microsoft/phi-1_5", "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": None, "embd_pdrop": 0.0, "eos_token_id": None, "hidden_act": "gelu_new",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "model_type": "phi", "num_attention_heads": 32, "num_hidden_layers": 24,
        "num_key_value_heads": None, "partial_rotary_factor": 0.5, "qk_layernorm": False, "resid_pdrop": 0.0,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.37.0", "use_cache": True, "vocab_size": 51200,
    },
}
#: model types whose parameter layout :func:`parameter_count` knows
LLAMA_LIKE = ("llama", "mistral")
SUPPORTED_TYPES = LLAMA_LIKE + ("phi",)


@dataclass(frozen=True)
class Arch:
    """The shape facts of a decoder-only LM that the formulas read (from its ``config.json``)."""

    name: str
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> Arch:
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_TYPES:
            raise UserError(f"{name}: model_type {mt!r} is not supported by the planner "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
        try:
            heads = int(cfg["num_attention_heads"])
            return cls(name=name, model_type=mt, vocab=int(cfg["vocab_size"]), hidden=int(cfg["hidden_size"]),
                       intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
                       kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       tied=bool(cfg.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{name}: config.json lacks or mangles {exc}") from None


def load_arch(model: str) -> Arch:
    """The :class:`Arch` of ``model``: ``tiny-llama[:SIZE]``, a built-in name, a ``config.json`` file, a local
    model / run directory holding one, or a LoRA adapter directory (its ``base_model_name_or_path``).
    Anything else is a one-line :class:`UserError`."""
    name = str(model)
    if name == "tiny-llama" or name.startswith("tiny-llama:"):
        from .models import TINY_SIZES, TINY_VOCAB

        size = name.split(":", 1)[1].lower() if ":" in name else "5m"
        if size not in TINY_SIZES:
            raise UserError(f"unknown tiny-llama size {size!r}; choose from {', '.join(TINY_SIZES)}")
        return Arch.from_config(name, {"model_type": "llama", "vocab_size": TINY_VOCAB,
                                       "tie_word_embeddings": False, **TINY_SIZES[size]})
    if name in BUILTIN_CONFIGS:
        return Arch.from_config(name, BUILTIN_CONFIGS[name])
    p = Path(name).expanduser()
    for adapter in (p / "adapter_config.json", p / "model" / "adapter_config.json"):
        if adapter.is_file() and not (adapter.parent / "config.json").is_file():   # a LoRA run's adapter dir
            try:
                base = json.loads(adapter.read_text())["base_model_name_or_path"]
            except (OSError, ValueError, KeyError, TypeError):
                raise UserError(f"{adapter}: no readable base_model_name_or_path") from None
            return load_arch(str(base))
    for cand in (p, p / "config.json", p / "model" / "config.json"):
        if cand.is_file():
            try:
                cfg = json.loads(cand.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"{cand}: not a readable config.json ({exc})") from None
            if not isinstance(cfg, dict):
                raise UserError(f"{cand}: config.json is not a JSON object")
            return Arch.from_config(name, cfg)
    raise UserError(f"unknown model {name!r}: not a config.json, a model directory, tiny-llama[:SIZE] or one of "
                    f"{', '.join(BUILTIN_CONFIGS)}")


# --------------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------------
def layer_linears(arch: Arch) -> dict[str, tuple[int, int, bool]]:
    """The Linear modules of one decoder layer: ``name -> (in_features, out_features, has_bias)``."""
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_dim
    if arch.model_type == "phi":
        return {"q_proj": (h, h, True), "k_proj": (h, kv, True), "v_proj": (h, kv, True), "dense": (h, h, True),
                "fc1": (h, i, True), "fc2": (i, h, True)}
    return {"q_proj": (h, h, False), "k_proj": (h, kv, False), "v_proj": (h, kv, False), "o_proj": (h, h, False),
            "gate_proj": (h, i, False), "up_proj": (h, i, False), "down_proj": (i, h, False)}


def parameter_count(arch: Arch) -> int:
    """Total parameters ``P``.

    Llama: ``V·h`` (embedding) + ``L·(2h² + 2h·kv + 3h·i + 2h)`` (q, o; k, v; gate, up, down; two RMSNorm
    weights) + ``h`` (final norm) + ``V·h`` (lm_head, unless tied). Phi: the same Linear layers with biases
    (q, k, v, dense, fc1, fc2), one LayerNorm (weight + bias) per layer and at the end, lm_head with a bias.
    """
    lin = sum(a * b + (b if bias else 0) for a, b, bias in layer_linears(arch).values())
    h, V = arch.hidden, arch.vocab
    if arch.model_type == "phi":
        per_layer, final_norm, head = lin + 2 * h, 2 * h, (0 if arch.tied else V * h + V)
    else:
        per_layer, final_norm, head = lin + 2 * h, h, (0 if arch.tied else V * h)
    return V * h + arch.layers * per_layer + final_norm + head


def matmul_parameters(arch: Arch) -> int:
    """``N``, the parameters that cost ``2N`` FLOPs per token forward: ``P`` minus the input embedding
    (a lookup), plus the tied lm_head when the embedding is reused as the output layer."""
    emb = arch.vocab * arch.hidden
    return parameter_count(arch) - emb + (emb if arch.tied else 0)


#: default LoRA targets: npo-tofu's (``full_scale.config.LORA_TARGETS``, the attention projections) for
#: Llama-family models; Phi's attention projections are q/k/v and ``dense``
DEFAULT_LORA_TARGETS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
                        "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
                        "phi": ("q_proj", "k_proj", "v_proj", "dense")}


def resolve_targets(arch: Arch, targets) -> tuple[str, ...]:
    """LoRA target module names: ``None`` = peft's default for the family, ``all-linear`` = every Linear of a
    decoder layer (peft's ``all-linear`` leaves out the lm_head too), else the names given."""
    if targets is None or targets == () or targets == "":
        if arch.model_type in LLAMA_LIKE:
            from . import config

            return tuple(getattr(config, "LORA_TARGETS", DEFAULT_LORA_TARGETS[arch.model_type]))
        return DEFAULT_LORA_TARGETS[arch.model_type]
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if tuple(targets) in (("all-linear",), ("all",)):
        return tuple(layer_linears(arch))
    known = layer_linears(arch)
    bad = [t for t in targets if t not in known]
    if bad:
        raise UserError(f"unknown LoRA target(s) {', '.join(bad)} for {arch.model_type}; choose from "
                        f"{', '.join(known)} or all-linear")
    return tuple(targets)


def lora_parameters(arch: Arch, r: int, targets) -> int:
    """Trainable LoRA parameters ``N_lora = L · Σ_targets r·(in + out)`` (A is r×in, B is out×r; no bias)."""
    lin = layer_linears(arch)
    return arch.layers * sum(r * (lin[t][0] + lin[t][1]) for t in resolve_targets(arch, targets))


# --------------------------------------------------------------------------------------------------
# launch: accelerate configs, precision
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launcher:
    """What an accelerate config means for memory: processes, and whether parameters/grads/states shard."""

    name: str
    processes: int
    sharding: str      #: "none" (single, DDP), "fsdp" (FULL_SHARD) or "zero3"
    mixed_precision: str = "no"


def read_accelerate(config: str, processes: int | None = None) -> Launcher:
    """An accelerate yaml (a path, or a name in :data:`ACCELERATE_DIR` such as ``fsdp``), with
    ``num_processes`` overridden by ``processes``. Unreadable or unknown configs are a :class:`UserError`."""
    import yaml

    p = Path(config)
    if not p.is_file():
        cand = ACCELERATE_DIR / (config if config.endswith(".yaml") else f"{config}.yaml")
        if cand.is_file():
            p = cand
        else:
            names = ", ".join(sorted(f.stem for f in ACCELERATE_DIR.glob("*.yaml")))
            raise UserError(f"accelerate config not found: {config} (a yaml path, or one of {names})")
    try:
        cfg = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{p}: not a readable accelerate yaml ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "distributed_type" not in cfg:
        raise UserError(f"{p}: not an accelerate config (no distributed_type)")
    dist = str(cfg["distributed_type"]).upper()
    n = int(cfg.get("num_processes") or 1) if processes is None else int(processes)
    if n < 1:
        raise UserError(f"processes must be >= 1, got {n}")
    if dist == "FSDP":
        strat = str((cfg.get("fsdp_config") or {}).get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        sharding = "fsdp" if strat in ("FULL_SHARD", "1", "HYBRID_SHARD") else "none"
    elif dist == "DEEPSPEED":
        stage = int((cfg.get("deepspeed_config") or {}).get("zero_stage", 0))
        if stage != 3:
            raise UserError(f"{p}: only ZeRO stage 3 is planned (got zero_stage {stage})")
        sharding = "zero3"
    elif dist in ("NO", "MULTI_GPU", "MULTI_CPU"):
        sharding = "none"
    else:
        raise UserError(f"{p}: distributed_type {dist} is not planned (NO, MULTI_GPU, FSDP, DEEPSPEED)")
    if dist == "NO" and n != 1:
        raise UserError(f"{p}: distributed_type NO runs one process, not {n}")
    return Launcher(p.stem, n, sharding, str(cfg.get("mixed_precision", "no")))


#: bytes per element: (weights, gradients, fp32 master copy, AdamW moments m+v, activations)
PRECISIONS: dict[str, dict[str, int]] = {
    # fp32 weights/grads, AdamW m and v in fp32; no master copy (the weights are the master)
    "fp32": {"weight": 4, "grad": 4, "master": 0, "moments": 8, "act": 4},
    # bf16 mixed precision (FSDP/DeepSpeed with mixed_precision: bf16, or AMP): bf16 compute weights and
    # grads, fp32 master weights and fp32 AdamW moments
    "bf16": {"weight": 2, "grad": 2, "master": 4, "moments": 8, "act": 2},
    # pure bf16: what ``npo-tofu --dtype bfloat16`` (the CUDA default) runs on one device: weights, grads
    # and torch's AdamW moments (zeros_like the bf16 parameters) all bf16, no master copy
    "bf16-pure": {"weight": 2, "grad": 2, "master": 0, "moments": 4, "act": 2},
}


# --------------------------------------------------------------------------------------------------
# what an objective runs: streams and the reference
# --------------------------------------------------------------------------------------------------
_FORGET_GRAD = frozenset({"logp", "length", "token_logp", "forget_logits", "hidden"})
_RETAIN_GRAD = frozenset({"retain_logp", "retain_logits", "retain_hidden"})


@dataclass(frozen=True)
class Streams:
    """Per micro-batch, how many B×T passes run with gradients, without, and through the reference."""

    grad: tuple[str, ...]        #: streams forwarded and back-propagated through the policy
    nograd: tuple[str, ...]      #: policy forwards without gradients (the logged retain NLL, ...)
    reference: tuple[str, ...]   #: reference forwards (frozen copy, or the adapter-disabled base)
    kl: tuple[str, ...]          #: streams whose loss holds policy and reference logits (KL, UNDIAL)
    ref_kind: str                #: "none", "cache", "model" (frozen copy) or "adapter-disabled"
    cached: tuple[str, ...]      #: reference keys cached once before training


def streams(objective, ref_mode: str, lora: bool, stop_on_collapse: bool = False) -> Streams:
    """The passes of one micro-batch of :meth:`full_scale.tasks.UnlearnTask.micro` for ``objective``.

    Forget: with gradients when the objective reads ``logp``/``length``/token or logit inputs, else a no-grad
    forward (it is always computed and logged). IDK: with gradients when ``idk_logp`` is read. Retain: with
    gradients when ``retain_logp``/``retain_logits``/``retain_hidden`` is read; otherwise forwarded without
    gradients only under ``--stop-on-collapse`` (the per-step retain NLL), else not at all. Reference:
    cached per-example keys (``ref_mode="cached"``) need no forward; every other reference input costs one
    reference forward of its stream.
    """
    from .tasks import REF_KEYS

    if ref_mode not in ("cached", "model"):
        raise UserError(f"ref_mode must be cached or model, got {ref_mode!r}")
    needs = objective.needs
    cached = tuple(k for k in REF_KEYS if k in needs) if ref_mode == "cached" else ()
    grad, nograd = [], []
    (grad if needs & _FORGET_GRAD else nograd).append("forget")
    if "idk_logp" in needs:
        grad.append("idk")
    if needs & _RETAIN_GRAD:
        grad.append("retain")
    elif stop_on_collapse:
        nograd.append("retain")
    ref = []
    if needs & ({"logp_ref", "ref_token_logp"} - set(cached)) or "forget_ref_logits" in needs:
        ref.append("forget")
    if "idk_logp_ref" in needs and "idk_logp_ref" not in cached:
        ref.append("idk")
    if needs & {"retain_ref_logits", "retain_ref_hidden"}:
        ref.append("retain")
    kl = tuple(s for s, k in (("forget", "forget_ref_logits"), ("retain", "retain_ref_logits")) if k in needs)
    keep_model = objective.needs_ref_logits or (ref_mode == "model" and objective.uses_reference)
    kind = ("adapter-disabled" if lora else "model") if keep_model else ("cache" if cached else "none")
    return Streams(tuple(grad), tuple(nograd), tuple(ref), kl, kind, cached)


# --------------------------------------------------------------------------------------------------
# memory formulas (bytes per device)
# --------------------------------------------------------------------------------------------------
def shard(x: float, launcher: Launcher) -> float:
    """``x / processes`` under FSDP FULL_SHARD and ZeRO-3, ``x`` otherwise (single device, DDP)."""
    return x / launcher.processes if launcher.sharding in ("fsdp", "zero3") else x


def parameter_bytes(P: int, prec: dict, launcher: Launcher) -> float:
    """Weights: ``P · b_w``, sharded under FSDP/ZeRO-3 (the one gathered layer is in the overhead)."""
    return shard(P * prec["weight"], launcher)


def gradient_bytes(n_train: int, prec: dict, launcher: Launcher) -> float:
    """Gradients of the trainable parameters: ``N_train · b_g`` (sharded under FSDP/ZeRO-3)."""
    return shard(n_train * prec["grad"], launcher)


#: what ``npo-tofu --optimizer`` takes (:data:`full_scale.config.OPTIMIZERS`)
OPTIMIZERS = ("adamw", "sgd")


def optimizer_bytes(n_train: int, prec: dict, launcher: Launcher, optimizer: str = "adamw") -> float:
    """AdamW: two moments (``b_m`` = 8 bytes in fp32 and bf16 mixed, 4 in pure bf16) plus the fp32 master
    copy under bf16 mixed precision (``b_master`` = 4): ``N_train · (b_m + b_master)``, sharded under
    FSDP/ZeRO-3. SGD without momentum keeps no moments (``b_m`` = 0): the master copy only."""
    moments = 0 if optimizer == "sgd" else prec["moments"]
    return shard(n_train * (moments + prec["master"]), launcher)


def snapshot_bytes(n_train: int, prec: dict, launcher: Launcher) -> float:
    """``train.run``'s θ_0 snapshot of the trainable parameters (for the logged ``param_dist``):
    ``N_train · b_w``; under FSDP/ZeRO-3 each rank clones its own shard after ``accelerate.prepare``."""
    return shard(n_train * prec["weight"], launcher)


def reference_bytes(P: int, prec: dict, launcher: Launcher, kind: str) -> float:
    """A frozen copy of θ_0 (``kind="model"``): ``P · b_w``, sharded like the policy (prepared in evaluation
    mode). ``adapter-disabled`` (LoRA) and cached references keep no copy: 0."""
    return parameter_bytes(P, prec, launcher) if kind == "model" else 0.0


def cache_bytes(n_examples: int, cached: tuple[str, ...], seq_len: int) -> float:
    """The reference cache: ``4 · n`` bytes per per-example key (``logp_ref``, ``idk_logp_ref``, fp32) and
    ``4 · n · (T − 1)`` for the per-token table ``ref_token_logp``."""
    per = {"logp_ref": 4, "idk_logp_ref": 4, "ref_token_logp": 4 * (seq_len - 1)}
    return float(sum(n_examples * per[k] for k in cached))


def layer_activation_elements(arch: Arch, prec: dict, trainable: tuple[str, ...] | None = None) -> float:
    """Per token and decoder layer, the activation elements autograd keeps for backward (in units of the
    activation dtype; HF modules, SDPA attention without its T² probabilities). Autograd saves an operand
    only when the other side needs a gradient, so a frozen Linear (LoRA: every non-target module) does
    not keep its input, and a frozen norm weight does not keep the normalised tensor.
    ``trainable``: the Linear modules with trainable weights (``None``: every weight is trained).

    Llama: RMSNorm ×2, each its fp32 input (``4/b_act`` elements), the normalised tensor (``h``, when its
    weight trains) and its output (``h``, when a Linear it feeds trains); SDPA q, k, v and output
    (``2h + 2kv``); o_proj's input (``h``); SiLU input, SiLU output and up output (``3i``) and down_proj's
    input (``i``). Full fine-tuning: ``(2·4/b_act + 7)h + 2kv + 4i``. RoPE keeps only cos/sin (per
    position, not per channel). Phi (parallel block, one LayerNorm): LayerNorm input and output
    (``4/b_act·h + h``), SDPA (``2h + 2kv``), dense input (``h``), fc1 output and gelu_new's tanh
    intermediates (``4i``), fc2 input (``i``).
    """
    h, kv, i = arch.hidden, arch.kv_dim, arch.intermediate
    full = trainable is None

    def tr(*names: str) -> int:
        return int(full or any(n in trainable for n in names))

    upcast = 4 / prec["act"]   # the norms compute in fp32 and keep their fp32 input
    if arch.model_type == "phi":
        norm = upcast * h + tr("q_proj", "k_proj", "v_proj", "fc1") * h
        return norm + 2 * h + 2 * kv + tr("dense") * h + 4 * i + tr("fc2") * i
    attn = upcast * h + int(full) * h + tr("q_proj", "k_proj", "v_proj") * h + 2 * h + 2 * kv + tr("o_proj") * h
    mlp = upcast * h + int(full) * h + tr("gate_proj", "up_proj") * h + 3 * i + tr("down_proj") * i
    return attn + mlp


def logit_bytes_per_token(arch: Arch, prec: dict, kl: bool) -> float:
    """Per token of a stream with gradients: the logits (``V · b_act``), their fp32 contiguous copy and
    fp32 log-softmax kept by the cross-entropy (``8V``); a KL stream also holds the reference logits and
    the KL's fp32 log-softmax, exp and difference tensors (``b_act·V + 16V``)."""
    V = arch.vocab
    return V * (prec["act"] + 8) + (V * (prec["act"] + 16) if kl else 0)


def activation_bytes(arch: Arch, prec: dict, tokens_grad: int, tokens_kl: int, tokens_max_stream: int,
                     checkpointing: bool, trainable: tuple[str, ...] | None = None) -> float:
    """Activations of one micro-batch (per device; never sharded: each device holds its own micro-batch).

    ``tokens_grad`` = B·T times the number of streams with gradients (they are all alive at ``backward``),
    ``tokens_kl`` the tokens of KL streams, ``tokens_max_stream`` = B·T.

    Without checkpointing: ``tokens_grad · (L · a_layer · b_act + logits)`` with ``a_layer`` =
    :func:`layer_activation_elements` and logits = :func:`logit_bytes_per_token`. With gradient
    checkpointing: only each layer's input is kept, ``tokens_grad · L · h · b_act``, plus one layer
    recomputed in backward, ``B·T · a_layer · b_act``, plus the logits. Plus the backward transient of the
    largest stream: the fp32 gradient of its logits and of their log-softmax, ``B·T · 8V``.
    """
    per_layer = layer_activation_elements(arch, prec, trainable) * prec["act"]
    logits = tokens_grad * logit_bytes_per_token(arch, prec, False) + tokens_kl * (
        logit_bytes_per_token(arch, prec, True) - logit_bytes_per_token(arch, prec, False))
    if checkpointing:
        body = tokens_grad * arch.layers * arch.hidden * prec["act"] + tokens_max_stream * per_layer
    else:
        body = tokens_grad * arch.layers * per_layer
    return body + logits + tokens_max_stream * 8 * arch.vocab


def nograd_bytes(arch: Arch, prec: dict, tokens_stream: int) -> float:
    """A forward without gradients keeps no activations, only its output logits (``B·T·V·(b_act + 8)``);
    counted once when a micro-batch has any no-grad or reference forward."""
    return tokens_stream * arch.vocab * (prec["act"] + 8)


#: runtime overhead per device, bytes: on a GPU the CUDA context, cuBLAS/NCCL workspaces and the caching
#: allocator's fragmentation (a stated 1.5 GiB, plus under FSDP/ZeRO-3 one gathered decoder layer); on the
#: CPU the resident size of a process that imported torch, transformers, accelerate and npo-tofu's
#: training code and loaded nothing, measured by bench/bench_memory.py (overridden with --overhead-mb)
GPU_OVERHEAD = 1.5 * GB
CPU_OVERHEAD_MB = 371.0   # bench/results/memory.json "overhead_mb" (torch 2.13, transformers 5.24)


def overhead_bytes(device: str, arch: Arch, prec: dict, launcher: Launcher, overhead_mb: float | None) -> float:
    """The stated runtime overhead (see :data:`GPU_OVERHEAD`, :data:`CPU_OVERHEAD_MB`)."""
    if overhead_mb is not None:
        base = overhead_mb * MB
    else:
        base = GPU_OVERHEAD if device == "gpu" else CPU_OVERHEAD_MB * MB
    gathered = 0.0
    if launcher.sharding in ("fsdp", "zero3"):   # one all-gathered decoder layer (two with prefetch)
        gathered = 2 * (parameter_count(arch) - 2 * arch.vocab * arch.hidden) / arch.layers * prec["weight"]
    return base + gathered


def overlap_bytes(activations: float, gradients: float, grad_accum: int) -> float:
    """With one micro-batch per step, gradients are allocated during ``backward`` as the activations are freed
    (``zero_grad(set_to_none=True)`` drops them after every step), so the peak holds ``max`` of the two:
    ``−min(activations, gradients)``. With accumulation the previous micro-batch's gradients stay: 0."""
    return -min(activations, gradients) if grad_accum == 1 else 0.0


def load_peak_bytes(P: int, n_train: int, prec: dict, ref_kind: str, launcher: Launcher) -> float:
    """Before ``accelerate.prepare`` every process holds the full model and the frozen copy (when there is
    one), unsharded, and, unless the run is sharded, the θ_0 snapshot:
    ``P·b_w · (1 + [frozen copy]) + [not sharded]·N_train·b_w``. Under FSDP/ZeRO-3 this, not the sharded
    training state, can set the peak."""
    snapshot = 0.0 if launcher.sharding in ("fsdp", "zero3") else n_train * prec["weight"]
    return P * prec["weight"] * (1 + (ref_kind == "model")) + snapshot


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
def attention_flops_per_token(arch: Arch, seq_len: int) -> float:
    """Forward attention-score FLOPs per token: ``4 · L · T · h`` (QKᵀ and the weighted sum of V over T
    positions, 2 FLOPs per multiply-add; the causal mask is not discounted)."""
    return 4.0 * arch.layers * seq_len * arch.hidden


def train_flops_per_token(N: int, n_lora: int, lora: bool, checkpointing: bool, attn: float) -> float:
    """A stream with gradients, per token. Full: ``6N + 3·attn`` (forward 2N, backward 4N: activation and
    weight gradients). LoRA: ``4N + 6·N_lora + 3·attn``: the backward still propagates activation
    gradients through the frozen weights (2N) but computes no weight gradients for them (−2N); the
    adapters cost ``6·N_lora``. Gradient checkpointing adds one more forward, ``2N + attn``."""
    base = (4 * N + 6 * n_lora) if lora else 6 * N
    return base + 3 * attn + ((2 * N + attn) if checkpointing else 0)


def forward_flops_per_token(N: int, attn: float) -> float:
    """A forward without gradients (retain NLL, reference, cache), per token: ``2N + attn``."""
    return 2 * N + attn


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------
#: forget split -> examples (TOFU: 200 authors × 20 questions; forgetXX = XX % of 4000); tofu-mini
#: (``--preset mini``): the 20 authors of its pool, forget10/20/50/90 = 2/4/10/18 authors
TOFU_EXAMPLES = 4000
MINI_FORGET = {k: 20 * n for k, n in MINI_FORGET_AUTHORS.items()}   # 20 QA per author


def split_examples(split: str, preset: str = "tofu") -> int:
    """Examples in a TOFU split: ``full`` 4000, ``forgetXX``/``retainYY`` XX % of 4000 (forget01 40,
    forget05 200, forget10 400, retain90 3600); with ``preset="mini"`` tofu-mini's forget sets (40/80/200)."""
    import re

    s = split.removeprefix("mini-")
    if preset == "mini":
        if s not in MINI_FORGET:
            raise UserError(f"unknown tofu-mini forget split {split!r}; choose from {', '.join(MINI_FORGET)}")
        return MINI_FORGET[s]
    if s == "full":
        return TOFU_EXAMPLES
    m = re.fullmatch(r"(forget|retain)(\d\d)", s)
    if not m or not 0 < int(m.group(2)) < 100:
        raise UserError(f"unknown TOFU split {split!r}: full, forgetXX or retainYY")
    return TOFU_EXAMPLES * int(m.group(2)) // 100


@dataclass(frozen=True)
class PlanRequest:
    """Everything ``npo-tofu plan`` reads (the flags)."""

    model: str
    method: str
    batch_size: int = 4
    grad_accum: int = 8
    seq_len: int = 512
    lora: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] | str | None = None
    dtype: str = "bf16"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    ref_mode: str = "cached"
    stop_on_collapse: bool = False
    accelerate: str = "single_gpu"
    processes: int | None = None
    device: str = "gpu"
    dialect: str = "npo-sim"
    forget: str = "forget10"
    preset: str = "tofu"
    epochs: int = 10
    tflops: float | None = None
    overhead_mb: float | None = None
    device_gb: tuple[float, ...] = ()


@dataclass(frozen=True)
class Memory:
    parts: dict[str, float]           #: the training-time breakdown, bytes per device
    load_peak: float                  #: before prepare (unsharded model + copy [+ snapshot]) + overhead

    @property
    def training(self) -> float:
        return sum(self.parts.values())

    @property
    def total(self) -> float:
        """Estimated peak per device: the larger of the training state and the load-time peak."""
        return max(self.training, self.load_peak)


@dataclass(frozen=True)
class Flops:
    per_token: float          #: FLOPs per example-token of a micro-batch (all its streams)
    per_step: float           #: all processes together
    per_epoch: float
    cache: float              #: the one-off reference cache pass
    tokens_per_step: int      #: example tokens per optimizer step (B·T·accum·processes)
    tokens_processed_per_step: int   #: tokens through a model per step (× streams)
    steps_per_epoch: int
    examples_per_epoch: int


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    arch: Arch
    arch_params: int
    trainable: int
    launcher: Launcher
    streams: Streams
    memory: Memory
    flops: Flops
    tflops: float
    seconds_per_epoch: float
    notes: tuple[str, ...] = field(default=())

    @property
    def seconds_total(self) -> float:
        return self.seconds_per_epoch * self.request.epochs + self.flops.cache / (
            self.tflops * 1e12 * self.launcher.processes)


#: default throughput: 40 % of an A100's dense bf16 peak (312 TFLOP/s) per device
A100_BF16_PEAK = 312.0
DEFAULT_MFU = 0.4


def _positive(name: str, value, minimum=1) -> None:
    if value is None or value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def make_plan(req: PlanRequest) -> Plan:
    """The plan of ``req``: every number from the functions above. Bad input is a one-line UserError."""
    from npo_sim.losses import OBJECTIVES, get_objective

    from .dialects import get_dialect

    for name in ("batch_size", "grad_accum", "seq_len", "epochs"):
        _positive(name.replace("_", "-"), getattr(req, name))
    if req.lora:
        _positive("lora-r", req.lora_r)
    if req.dtype not in PRECISIONS:
        raise UserError(f"dtype must be one of {', '.join(PRECISIONS)}, got {req.dtype!r}")
    if req.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {req.optimizer!r}")
    if req.device not in ("gpu", "cpu"):
        raise UserError(f"device must be gpu or cpu, got {req.device!r}")
    if req.tflops is not None and not (req.tflops > 0 and math.isfinite(req.tflops)):
        raise UserError(f"tflops must be > 0, got {req.tflops}")
    if req.method not in OBJECTIVES:
        raise UserError(f"unknown method {req.method!r}; choose from {', '.join(sorted(OBJECTIVES))}")
    dialect = get_dialect(req.dialect)
    objective = get_objective(req.method)
    arch = load_arch(req.model)
    launcher = read_accelerate(req.accelerate, req.processes)
    prec = PRECISIONS[req.dtype]
    n_examples = split_examples(req.forget, req.preset)

    P, N = parameter_count(arch), matmul_parameters(arch)
    n_lora = lora_parameters(arch, req.lora_r, req.lora_targets) if req.lora else 0
    n_train = n_lora if req.lora else P
    st = streams(objective, req.ref_mode, req.lora, req.stop_on_collapse)
    if dialect.idk_sampling == "per_step" and "idk_logp_ref" in objective.needs and "idk_logp_ref" in st.cached:
        cached = tuple(k for k in st.cached if k != "idk_logp_ref")
        kind = st.ref_kind if st.ref_kind in ("model", "adapter-disabled") else ("adapter-disabled" if req.lora
                                                                                 else "model")
        st = dataclasses.replace(st, cached=cached, ref_kind=kind, reference=st.reference + ("idk",))

    B, T = req.batch_size, req.seq_len
    bt = B * T
    parts = {
        "parameters": parameter_bytes(P, prec, launcher),
        "gradients": gradient_bytes(n_train, prec, launcher),
        "optimizer": optimizer_bytes(n_train, prec, launcher, req.optimizer),
        "theta0 snapshot": snapshot_bytes(n_train, prec, launcher),
        "activations": (activation_bytes(arch, prec, bt * len(st.grad), bt * len(st.kl), bt,
                                         req.gradient_checkpointing,
                                         resolve_targets(arch, req.lora_targets) if req.lora else None)
                        + (nograd_bytes(arch, prec, bt) if (st.nograd or st.reference) else 0.0)),
        "reference copy": reference_bytes(P, prec, launcher, st.ref_kind),
        "reference cache": cache_bytes(n_examples, st.cached, T),
        "runtime overhead": overhead_bytes(req.device, arch, prec, launcher, req.overhead_mb),
    }
    parts["grad/act overlap"] = overlap_bytes(parts["activations"], parts["gradients"], req.grad_accum)
    memory = Memory(parts, load_peak_bytes(P, n_train, prec, st.ref_kind, launcher) + parts["runtime overhead"])

    attn = attention_flops_per_token(arch, T)
    per_token = (len(st.grad) * train_flops_per_token(N, n_lora, req.lora, req.gradient_checkpointing, attn)
                 + (len(st.nograd) + len(st.reference)) * forward_flops_per_token(N, attn))
    per_step_examples = B * req.grad_accum * launcher.processes
    steps = math.ceil(n_examples / per_step_examples)
    n_cache_streams = len(st.cached)   # tasks.UnlearnTask._cache: one forward over the forget set per key
    flops = Flops(per_token=per_token, per_step=per_token * per_step_examples * T,
                  per_epoch=per_token * n_examples * T,
                  cache=n_cache_streams * n_examples * T * forward_flops_per_token(N, attn),
                  tokens_per_step=per_step_examples * T,
                  tokens_processed_per_step=per_step_examples * T * (len(st.grad) + len(st.nograd) + len(st.reference)),
                  steps_per_epoch=steps, examples_per_epoch=n_examples)
    tflops = req.tflops if req.tflops is not None else DEFAULT_MFU * A100_BF16_PEAK
    seconds = flops.per_epoch / (tflops * 1e12 * launcher.processes)

    notes = []
    if launcher.sharding != "none" and memory.load_peak > memory.training:
        notes.append("the load-time peak (full model + copy on every process, before prepare) "
                     "exceeds the sharded training state")
    if st.ref_kind == "model" and req.lora:
        notes.append("LoRA: the reference is the adapter-disabled base")
    if launcher.sharding == "zero3" and st.ref_kind == "model":
        notes.append("*_kl / --ref-mode model under ZeRO-3: the reference is a deepspeed.initialize engine "
                     "without an optimizer, untested in this repository (README: known limits)")
    return Plan(req, arch, P, n_train, launcher, st, memory, flops, tflops, seconds, tuple(notes))


# --------------------------------------------------------------------------------------------------
# the paper's recipe and the fits table
# --------------------------------------------------------------------------------------------------
#: the NPO paper's TOFU recipe (Zhang et al. 2024, §5; the NPO repository's TOFU code, a fork of
#: locuslab/tofu): Llama-2-7b-chat fine-tuned on TOFU, forget10, AdamW (weight decay 0.01), lr 1e-5,
#: 10 epochs, β = 0.1, effective batch 32, examples of at most 500 tokens (tofu's ``max_length=500`` in
#: ``forget.py``), bf16. The effective batch is kept at 32 on every setup: 4 per device × 8 accumulation
#: on 1 device (``--preset tofu``), × 4 on 2, × 1 on 8.
RECIPES: dict[str, dict] = {
    "paper-llama2-7b": dict(model="meta-llama/Llama-2-7b-chat-hf", forget="forget10", batch_size=4, grad_accum=8,
                            seq_len=500, dtype="bf16", epochs=10, accelerate="single_gpu", preset="tofu"),
}
#: the setups of the fits table: (label, devices, GiB per device)
FIT_SETUPS = ((1, 80.0), (2, 40.0), (8, 24.0))
EFFECTIVE_BATCH = 32
#: the columns of the fits table: (LoRA, gradient checkpointing)
FIT_MODES = ((False, False), (False, True), (True, False), (True, True))


def fits_table(req: PlanRequest) -> list[dict]:
    """For each of 1×80 GB, 2×40 GB, 8×24 GB and each launcher (single/DDP, FSDP, ZeRO-3), full and LoRA
    (the request's rank and targets), each without and with gradient checkpointing (``+gc``):
    the planned peak per device at effective batch 32 (4 per device × 32/(4·devices) accumulation) and
    whether it fits (peak ≤ device memory)."""
    rows = []
    for n, gb in FIT_SETUPS:
        launchers = ("single_gpu",) if n == 1 else ("ddp", "fsdp", "deepspeed_zero3")
        for acc in launchers:
            for lora, gc in FIT_MODES:
                r = dataclasses.replace(req, accelerate=acc, processes=n, lora=lora, gradient_checkpointing=gc,
                                        batch_size=4, grad_accum=max(1, EFFECTIVE_BATCH // (4 * n)), device="gpu",
                                        overhead_mb=None)
                p = make_plan(r)
                rows.append({"setup": f"{n}x{gb:g}GB", "launcher": acc,
                             "mode": ("lora" if lora else "full") + ("+gc" if gc else ""),
                             "peak_gb": p.memory.total / GB, "fits": p.memory.total <= gb * GB,
                             "hours": p.seconds_total / 3600})
    return rows


# --------------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------------
def _gb(x: float) -> str:
    if x >= 0.1 * GB:
        return f"{x / GB:8.2f} GB"
    return f"{x / MB:8.1f} MB" if x >= 0.1 * MB or x == 0 else f"{x / 1024:8.1f} KB"


def _si(x: float) -> str:
    for unit, s in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= unit:
            return f"{x / unit:.3g} {s}"
    return f"{x:.3g} "


def format_plan(p: Plan, fits: list[dict] | None = None) -> str:
    r, st, m, f = p.request, p.streams, p.memory, p.flops
    mode = (f"LoRA r={r.lora_r} on {','.join(resolve_targets(p.arch, r.lora_targets))}" if r.lora
            else "full fine-tuning")
    lines = [
        f"plan: {r.method} on {p.arch.name} ({p.arch_params:,} parameters; trainable {p.trainable:,}, {mode})",
        f"  {p.launcher.name}: {p.launcher.processes} process(es), sharding {p.launcher.sharding}; "
        f"{r.dtype}{'; sgd (no moments)' if r.optimizer == 'sgd' else ''}; "
        f"batch {r.batch_size} x accum {r.grad_accum} x {p.launcher.processes} = "
        f"{r.batch_size * r.grad_accum * p.launcher.processes}; seq {r.seq_len}; "
        f"gradient checkpointing {'on' if r.gradient_checkpointing else 'off'}; ref mode {r.ref_mode}; "
        f"dialect {r.dialect}",
        f"  streams per micro-batch: grad {','.join(st.grad) or '-'}; no-grad {','.join(st.nograd) or '-'}; "
        f"reference {','.join(st.reference) or '-'} ({st.ref_kind}"
        + (f"; cached {','.join(st.cached)}" if st.cached else "") + ")",
        f"memory per device ({r.device}):",
    ]
    for k, v in m.parts.items():
        lines.append(f"  {k:<18}{_gb(v)}")
    lines.append(f"  {'= training peak':<18}{_gb(m.training)}")
    lines.append(f"  {'load-time peak':<18}{_gb(m.load_peak)}  (before prepare: unsharded model and copy)")
    lines.append(f"  {'ESTIMATED PEAK':<18}{_gb(m.total)}")
    lines += [
        f"compute: {f.examples_per_epoch} examples/epoch ({r.forget}), {f.steps_per_epoch} steps/epoch, "
        f"{r.epochs} epochs",
        f"  tokens/step {f.tokens_per_step:,} (through a model: {f.tokens_processed_per_step:,}); "
        f"tokens/epoch {f.examples_per_epoch * r.seq_len:,}",
        f"  FLOPs/token {_si(f.per_token)}; FLOPs/step {_si(f.per_step)}FLOP; FLOPs/epoch {_si(f.per_epoch)}FLOP; "
        f"reference cache {_si(f.cache) if f.cache else '0 '}FLOP (once)",
        f"  time at {p.tflops:g} TFLOP/s per device"
        + (" (default: 0.4 x A100 bf16 dense peak 312)" if r.tflops is None else "")
        + f": {p.seconds_per_epoch / 60:.1f} min/epoch, {p.seconds_total / 3600:.2f} h total",
    ]
    lines += [f"note: {n}" for n in p.notes]
    if fits:
        lines.append("fits (effective batch 32 = 4/device x accum x devices; peak GB per device, yes/no):")
        modes = [("lora" if lo else "full") + ("+gc" if gc else "") for lo, gc in FIT_MODES]
        lines.append(f"  {'setup':<9}{'launcher':<17}" + "".join(f"{m:>12}" for m in modes))
        by = {}
        for row in fits:
            by.setdefault((row["setup"], row["launcher"]), {})[row["mode"]] = row
        for (setup, acc), d in by.items():
            cells = [f"{d[k]['peak_gb']:.1f} {'yes' if d[k]['fits'] else 'no '}" for k in modes]
            lines.append(f"  {setup:<9}{acc:<17}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def plan_dict(p: Plan, fits: list[dict] | None = None) -> dict:
    """The plan as JSON-able numbers (``npo-tofu plan --json``)."""
    return {"request": dataclasses.asdict(p.request), "parameters": p.arch_params, "trainable": p.trainable,
            "launcher": dataclasses.asdict(p.launcher), "streams": dataclasses.asdict(p.streams),
            "memory_bytes": {**p.memory.parts, "training": p.memory.training, "load_peak": p.memory.load_peak,
                             "peak": p.memory.total},
            "flops": dataclasses.asdict(p.flops), "tflops": p.tflops, "seconds_per_epoch": p.seconds_per_epoch,
            "seconds_total": p.seconds_total, "notes": list(p.notes), "fits": fits}


#: defaults of the flags a recipe does not set
PLAN_DEFAULTS = dict(batch_size=4, grad_accum=8, dtype="bf16", optimizer="adamw", epochs=10, accelerate="single_gpu",
                 forget="forget10", preset="tofu")
