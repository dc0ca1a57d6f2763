"""Models and tokenizers: Hugging Face ids / local checkpoints, and tiny-llama built from a config.

``load_model("tiny-llama:5m")`` builds a :class:`~transformers.LlamaForCausalLM` from a config
(about 1M / 5M / 20M parameters) and a byte-level BPE tokenizer trained on the TOFU text with
``tokenizers`` (deterministic, about 0.3 s). Anything else is an HF id or a local directory loaded
with ``from_pretrained`` (``trust_remote_code=False``; bf16 on CUDA). :func:`save_checkpoint` writes
model + tokenizer with ``save_pretrained`` (safetensors) and ``npo_sim.json`` (prompt format and
provenance), so every checkpoint reloads with ``from_pretrained`` or :func:`load_model`.

**LoRA** (peft): :func:`add_lora` puts adapters on a loaded model (their targets checked first, one
line for a name the model lacks); a checkpoint of a LoRA run is an *adapter directory*
(``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer and ``npo_sim.json``).
:func:`load_model` accepts one: it loads the base its ``adapter_config.json`` records
(``base_model_name_or_path``, or ``base_model=``), applies the adapters and merges them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from npo_sim.runio import FILE_MODE, UserError, write_json

from .data import PROMPT_FORMATS, load_split, resolve_data_dir

META_FILE = "npo_sim.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}

#: tiny-llama size -> LlamaConfig fields (parameter counts with the 4096-token vocabulary)
TINY_SIZES: dict[str, dict] = {
    "1m": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4),
    "5m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8),
    "20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=6),
    # 84,165,888 parameters: bench/bench_memory.py's model (the memory rows need >= 80M on the CPU)
    "80m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=11, num_attention_heads=12),
}
TINY_VOCAB = 4096
TINY_MAX_POSITIONS = 512


# --------------------------------------------------------------------------------------------------
# tiny-llama
# --------------------------------------------------------------------------------------------------
def tofu_text(data_dir=None) -> list[str]:
    """Every question/answer string of the TOFU files, in a fixed order (tokenizer training corpus)."""
    texts: list[str] = []
    for name in ("full", "forget10_perturbed", "retain_perturbed", "real_authors", "world_facts",
                 "real_authors_perturbed", "world_facts_perturbed"):
        for r in load_split(name, data_dir):
            texts.append(r["question"])
            texts.append(r["answer"])
            texts.extend(r.get("perturbed_answer", []))
            if "paraphrased_answer" in r:
                texts.append(r["paraphrased_answer"])
    texts.extend(load_split("idontknow", data_dir))
    texts.extend(f.template.format(question="") for f in PROMPT_FORMATS.values() if not f.use_chat_template)
    return texts


def train_tokenizer(data_dir=None, vocab_size: int = TINY_VOCAB):
    """A byte-level BPE trained on the TOFU text, wrapped for transformers (pad/bos/eos set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tofu_text(data_dir), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def tiny_llama(size: str = "5m", *, data_dir=None, seed: int = 0):
    """``(model, tokenizer)``: a freshly initialised (seeded) LlamaForCausalLM and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = size.lower()
    if size not in TINY_SIZES:
        raise UserError(f"unknown tiny-llama size {size!r}; choose from {', '.join(TINY_SIZES)}")
    tokenizer = train_tokenizer(data_dir)
    cfg = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=TINY_MAX_POSITIONS,
                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      **TINY_SIZES[size])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# loading and saving
# --------------------------------------------------------------------------------------------------
def guess_format(name_or_path: str, tokenizer) -> str:
    """The PROMPT_FORMATS key for a model family (checkpoints carry theirs in npo_sim.json)."""
    meta = Path(name_or_path) / META_FILE
    if meta.is_file():
        fmt = json.loads(meta.read_text()).get("prompt_format")
        if fmt in PROMPT_FORMATS:
            return fmt
    low = str(name_or_path).lower()
    if "llama-2" in low and "chat" in low:
        return "llama2-chat"
    if "phi" in low:
        return "phi"
    if getattr(tokenizer, "chat_template", None):
        return "chat-template"
    return "plain"


def resolve_checkpoint(name_or_path) -> str | Path:
    """A run directory (``npo-tofu finetune/unlearn --out DIR``) stands for its final ``DIR/model`` (a full
    model or, for an unmerged LoRA run, an adapter directory)."""
    p = Path(name_or_path) / "model"
    if ((p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file()) and (p / META_FILE).is_file():
        return p
    return name_or_path


def is_adapter_dir(path) -> bool:
    """A peft adapter directory (``adapter_config.json``), e.g. the ``model/`` of an unmerged LoRA run."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _is_tiny(name: str) -> bool:
    return name == "tiny-llama" or name.startswith("tiny-llama:")


def _looks_local(name: str) -> bool:
    """A hub id is "org/name" (one slash); anything existing, absolute, relative (./, ../, ~) or deeper is local."""
    return (Path(name).exists() or name.startswith((os.sep, ".", "~"))
            or name.count("/") > 1 or (os.sep != "/" and os.sep in name))


def default_dtype(device) -> torch.dtype:
    dev = torch.device(device) if device is not None else None
    return torch.bfloat16 if dev is not None and dev.type == "cuda" else torch.float32


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def check_local_checkpoint(path, allow_pickle: bool = False) -> None:
    """Refuse a local model directory that cannot be loaded safely, in one line, before any loading:
    no tokenizer files, pickle-only weights (unless ``allow_pickle``), or a truncated/corrupt
    safetensors file (its header and size are checked without reading the tensors)."""
    d = Path(path)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"no tokenizer files in {d} ({' / '.join(TOKENIZER_FILES)})")
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        if any((d / f).is_file() for f in PICKLE_WEIGHTS):
            if allow_pickle:
                return
            raise UserError(f"{d} holds only pickle weights (pytorch_model.bin), which are not loaded: convert "
                            "them to safetensors, or pass --allow-pickle-weights if you trust their source")
        raise UserError(f"no model weights in {d} (model.safetensors)")
    from safetensors import SafetensorError, safe_open

    for f in shards:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{f}: truncated or corrupt safetensors file ({str(exc).strip()})") from None


def load_model(name_or_path: str, *, device=None, dtype=None, data_dir=None, seed: int = 0,
               allow_pickle: bool = False, base_model: str | None = None):
    """``(model, tokenizer, fmt_name)`` for an HF id, a local checkpoint, an adapter directory (loaded onto
    its base, or ``base_model``, and merged), or ``tiny-llama[:SIZE]``.

    The tokenizer always has a pad token (EOS when the model defines none, as TOFU does).
    ``dtype`` defaults to bf16 on CUDA and fp32 elsewhere. Weights are loaded from safetensors only
    (``use_safetensors=True``) unless ``allow_pickle`` (``--allow-pickle-weights``).
    """
    name = str(name_or_path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = default_dtype(device)
    if not _is_tiny(name) and is_adapter_dir(resolve_checkpoint(name)):
        return load_adapter(resolve_checkpoint(name), base_model, device=device, dtype=dtype, data_dir=data_dir,
                            seed=seed, allow_pickle=allow_pickle)
    if base_model is not None:
        raise UserError(f"--base-model is for an adapter directory ({ADAPTER_CONFIG}); {name} is a full model")
    if _is_tiny(name):
        size = name.split(":", 1)[1] if ":" in name else "5m"
        resolve_data_dir(data_dir)  # clear error before any work
        model, tokenizer = tiny_llama(size, data_dir=data_dir, seed=seed)
        fmt = "plain"
    else:
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = str(resolve_checkpoint(name))
        looks_local = _looks_local(name)
        if looks_local and not Path(name).is_dir():
            raise UserError(f"model directory not found: {name}")
        if looks_local and (Path(name) / "checkpoints").is_dir() and not (Path(name) / "model").is_dir():
            raise UserError(f"{name} is a run directory without its final model/ (unfinished: continue it with "
                            "--resume)")
        if looks_local:
            check_local_checkpoint(name, allow_pickle)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"could not load the tokenizer of {name!r}: {_first_line(exc)}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=False,
                                                         use_safetensors=None if allow_pickle else True)
        except SafetensorError as exc:
            raise UserError(f"{name}: truncated or corrupt safetensors weights ({_first_line(exc)})") from None
        except OSError as exc:
            raise UserError(f"could not load model {name!r}: {_first_line(exc)}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        fmt = guess_format(name, tokenizer)
    model = model.to(device=device, dtype=dtype)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, fmt


def load_adapter(path, base_model: str | None = None, *, device=None, dtype=None, data_dir=None, seed: int = 0,
                 allow_pickle: bool = False):
    """``(model, tokenizer, fmt)`` of an adapter directory: its base (``base_model``, else the
    ``base_model_name_or_path`` of its ``adapter_config.json``) with the adapters applied and merged.
    A tiny-llama base is rebuilt with the seed its ``npo_sim.json`` records (``base_seed``)."""
    d = Path(path)
    try:
        acfg = json.loads((d / ADAPTER_CONFIG).read_text())
        meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
    except ValueError as exc:
        raise UserError(f"{d}: adapter_config.json / npo_sim.json is not valid JSON ({exc})") from None
    base = base_model or acfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"adapter directory {d} does not name its base model (base_model_name_or_path): "
                        "pass --base-model")
    base = str(base)
    if not _is_tiny(base) and _looks_local(base) and not Path(base).exists():
        if base_model:
            raise UserError(f"--base-model {base} is not found")
        raise UserError(f"adapter directory {d}: its base model {base} is not found (pass --base-model)")
    weights = d / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{weights}: truncated or corrupt safetensors file ({_first_line(exc)})") from None
    elif (d / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise UserError(f"{d} holds only pickle adapter weights ({ADAPTER_PICKLE}), which are not loaded: "
                            "convert them to safetensors, or pass --allow-pickle-weights if you trust their source")
        sd = torch.load(d / ADAPTER_PICKLE, weights_only=True, map_location="cpu")
    else:
        raise UserError(f"no adapter weights in {d} ({ADAPTER_WEIGHTS})")
    model, tokenizer, fmt = load_model(base, device=device, dtype=dtype, data_dir=data_dir,
                                       seed=int(meta.get("base_seed", seed)), allow_pickle=allow_pickle)
    if any((d / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"could not load the tokenizer of {d}: {_first_line(exc)}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    try:
        lcfg = LoraConfig.from_pretrained(str(d))
    except (TypeError, ValueError, OSError) as exc:
        raise UserError(f"{d / ADAPTER_CONFIG}: not a LoRA adapter config ({_first_line(exc)})") from None
    lcfg.inference_mode = True
    try:
        with torch.random.fork_rng(devices=[]):  # the adapters' random init must not move the caller's RNG
            peft_model = get_peft_model(model, lcfg)
        result = set_peft_model_state_dict(peft_model, sd)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"adapter directory {d} does not fit its base {base}: {_first_line(exc)}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(f"adapter directory {d} does not fit its base {base} (missing {missing[:3]}, "
                        f"unexpected {list(result.unexpected_keys)[:3]})")
    model = peft_model.merge_and_unload()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, guess_format(str(d), tokenizer) if (d / META_FILE).is_file() else fmt


#: module classes LoRA adapts (peft's LoRA layer types)
def _lora_layer_types():
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)


def check_lora_targets(model, targets) -> None:
    """One line unless every name in ``targets`` is a module of ``model`` that LoRA adapts (its last name
    component, as peft matches ``target_modules``, or its full dotted name)."""
    if list(targets) == ["all-linear"]:
        return
    types = _lora_layer_types()
    modules = list(model.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, torch.nn.Linear) and n})
    for t in targets:
        hits = [m for n, m in modules if n and (n == t or n.endswith("." + t))]
        if not hits:
            raise UserError(f"--lora-targets: {model.__class__.__name__} has no module named {t!r} "
                            f"(its linear layers: {', '.join(linear)})")
        bad = [m for m in hits if not isinstance(m, types)]
        if bad:
            raise UserError(f"--lora-targets: {t!r} is a {type(bad[0]).__name__}, not a linear, embedding or conv "
                            f"layer (its linear layers: {', '.join(linear)})")


def add_lora(model, lora: dict, *, base: str, seed: int = 0):
    """``model`` wrapped by peft with LoRA adapters ``lora`` (``r``, ``alpha``, ``dropout``, ``targets``); only the
    adapters train. The adapters' init is drawn from ``seed`` (the caller's RNG does not move); ``base`` is
    what ``adapter_config.json`` records as ``base_model_name_or_path``."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, lora["targets"])
    targets = "all-linear" if list(lora["targets"]) == ["all-linear"] else list(lora["targets"])
    cfg = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                     target_modules=targets, bias="none", task_type="CAUSAL_LM")
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, cfg)
        except ValueError as exc:
            raise UserError(f"--lora-targets: {_first_line(exc)}") from None
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def enable_gradient_checkpointing(model, lora: bool) -> None:
    """Non-reentrant activation checkpointing on ``model`` (an HF model, before any peft wrapping). With LoRA
    the embedding outputs are made to require grad (``enable_input_require_grads``), so the adapters inside
    checkpointed layers receive gradients even with frozen embeddings (cf. open-unlearning#178)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"--gradient-checkpointing: {model.__class__.__name__} does not support it")
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if lora:
        model.enable_input_require_grads()


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def fix_permissions(directory) -> None:
    """safetensors keeps its temporary file's mode (0600): give the weights the usual 0666 & ~umask."""
    for f in Path(directory).glob("*.safetensors"):
        os.chmod(f, FILE_MODE)


def save_checkpoint(model, tokenizer, out_dir, extra: dict | None = None, *, state_dict=None,
                    is_main_process: bool = True, save_function=None) -> Path:
    """Model + tokenizer via ``save_pretrained`` (safetensors) and ``npo_sim.json`` with ``extra``.

    Under FSDP/DeepSpeed pass the gathered ``state_dict`` and the accelerator's ``save`` function.
    Not atomic by itself: :func:`full_scale.checkpoint.save_model` writes into a temporary sibling
    directory and renames it into place.
    """
    out = Path(out_dir)
    kw = {"state_dict": state_dict, "is_main_process": is_main_process}
    if is_peft_model(model):  # the adapters only, as safetensors (never a pickle)
        kw.update(safe_serialization=True, save_embedding_layers=False)
    elif save_function is not None:
        kw["save_function"] = save_function
    model.save_pretrained(out, **kw)
    if is_main_process:
        if is_peft_model(model):  # peft's model-card template, with nothing of this run in it
            (out / "README.md").unlink(missing_ok=True)
        fix_permissions(out)
        tokenizer.save_pretrained(out)
        write_json(out / META_FILE, dict(extra or {}))
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
