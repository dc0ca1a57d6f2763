"""Models and tokenizers: Hugging Face ids / local checkpoints, and tiny-llama built from a config.

``load_model("tiny-llama:5m")`` builds a :class:`~transformers.LlamaForCausalLM` from a config
(about 1M / 5M / 20M parameters) and a byte-level BPE tokenizer trained on the TOFU text with
``tokenizers`` (deterministic, about 0.3 s). Anything else is an HF id or a local directory loaded
with ``from_pretrained`` (``trust_remote_code=False``; bf16 on CUDA). :func:`save_checkpoint` writes
model + tokenizer with ``save_pretrained`` (safetensors) and ``npo_sim.json`` (prompt format and
provenance), so every checkpoint reloads with ``from_pretrained`` or :func:`load_model`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from npo_sim.runio import FILE_MODE, UserError, write_json

from .data import PROMPT_FORMATS, load_split, resolve_data_dir

META_FILE = "npo_sim.json"
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}

#: tiny-llama size -> LlamaConfig fields (parameter counts with the 4096-token vocabulary)
TINY_SIZES: dict[str, dict] = {
    "1m": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4),
    "5m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8),
    "20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=6),
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
    """A run directory (``npo-tofu finetune/unlearn --out DIR``) stands for its final ``DIR/model``."""
    p = Path(name_or_path) / "model"
    if (p / "config.json").is_file() and (p / META_FILE).is_file():
        return p
    return name_or_path


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
               allow_pickle: bool = False):
    """``(model, tokenizer, fmt_name)`` for an HF id, a local checkpoint, or ``tiny-llama[:SIZE]``.

    The tokenizer always has a pad token (EOS when the model defines none, as TOFU does).
    ``dtype`` defaults to bf16 on CUDA and fp32 elsewhere. Weights are loaded from safetensors only
    (``use_safetensors=True``) unless ``allow_pickle`` (``--allow-pickle-weights``).
    """
    name = str(name_or_path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = default_dtype(device)
    if name == "tiny-llama" or name.startswith("tiny-llama:"):
        size = name.split(":", 1)[1] if ":" in name else "5m"
        resolve_data_dir(data_dir)  # clear error before any work
        model, tokenizer = tiny_llama(size, data_dir=data_dir, seed=seed)
        fmt = "plain"
    else:
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = str(resolve_checkpoint(name))
        # a hub id is "org/name" (one slash); anything existing, absolute, relative (./, ../, ~) or deeper is local
        looks_local = (Path(name).exists() or name.startswith((os.sep, ".", "~"))
                       or name.count("/") > 1 or (os.sep != "/" and os.sep in name))
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
    if save_function is not None:
        kw["save_function"] = save_function
    model.save_pretrained(out, **kw)
    if is_main_process:
        fix_permissions(out)
        tokenizer.save_pretrained(out)
        write_json(out / META_FILE, dict(extra or {}))
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
