"""TOFU data: loading and validation, prompt formats, answer masking, forget/retain pairing, tofu-mini.

Splits are JSON-lines files in a local directory (``--data-dir`` or ``$NPO_TOFU_DIR``), or
``datasets.load_dataset("locuslab/TOFU", name)`` on machines with hub access.

Tokenisation (:func:`encode_qa`) encodes the prompt and the answer *separately*, so the answer mask
is exact token by token: ``[BOS] prompt-tokens answer-tokens EOS`` with labels ``-100`` on BOS and
the prompt, and the answer tokens plus EOS as targets. BOS is prepended when the tokenizer has one
(and the rendered prompt does not already start with it); EOS is always appended. Every code path
(fine-tuning, unlearning, reference log-probs, evaluation) goes through this one function.

tofu-mini (the CPU preset): the 20 authors of ``forget10`` (the last 400 QA pairs of ``full``, all
with paraphrased/perturbed answers in ``forget10_perturbed``). ``forget10/20/50/90`` are the last
2/4/10/18 of those authors and ``retain90/80/50/10`` the rest (``retain10``: the first 2 authors).
Tiny models start from nothing, so the mini fine-tuning corpus adds the ``real_authors`` and
``world_facts`` QA as general knowledge that both the target and the retain model learn (a deviation
from TOFU, documented in the README).

The tofu-mini **holdout** (:func:`mini_holdout`), the non-members of the membership-inference attacks
and privleak: the 10 authors just before the pool in ``full.json`` (authors 170-179 counting from 0,
rows 3400-3599, 200 QA). Neither the mini target nor the mini oracle is trained on them. On full
TOFU a holdout file is passed (:func:`load_holdout`, e.g. open-unlearning's holdout01/05/10).

**Validation / test questions** (:func:`question_subset`, ``EvalSpec.questions``), so that a tuning
grid selects on some evaluation questions and reports on disjoint ones. The rule is fixed and per
author: within each author's block of 20 QA pairs (TOFU's author sets start on an author boundary,
so a row's position in its block is its index in the set mod 20, which is also its ``full.json`` row
index mod 20), the questions at positions 0, 5, 10, 15 are ``val`` and the other 16 are ``test``.
Sets that are not author blocks (``real_authors``, ``world_facts``) take every 5th row overall
(indices 0, 5, 10, ...) as ``val``. ``all`` keeps every row. The subset is taken before an eval set is
cut to ``ds_size`` rows. An eval log of ``val``/``test`` says so under its ``questions`` key (absent:
``all``, byte-identical to logs from before the subsets), and forget quality against a retain log of
another subset is refused (``--allow-mismatched-logs``: compared anyway, with a note).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from npo_sim.runio import UserError

IGNORE_INDEX = -100
AUTHOR_SIZE = 20  # every TOFU author has 20 consecutive QA pairs

_PCTS_FORGET = ("01", "05", "10", "20", "30", "50", "90")
_PCTS_RETAIN = ("10", "50", "70", "80", "90", "95", "99")

#: split name -> kind; the kind fixes the required fields (see :data:`REQUIRED`)
SPLITS: dict[str, str] = {
    "full": "qa",
    **{f"forget{p}": "qa" for p in _PCTS_FORGET},
    **{f"retain{p}": "qa" for p in _PCTS_RETAIN},
    **{f"forget{p}_perturbed": "perturbed5" for p in ("01", "05", "10")},
    "retain_perturbed": "perturbed5",
    "real_authors": "options",
    "world_facts": "options",
    "real_authors_perturbed": "perturbed3",
    "world_facts_perturbed": "perturbed3",
    "idontknow": "lines",
}

#: kind -> (required string fields, number of perturbed answers or None)
REQUIRED: dict[str, tuple[tuple[str, ...], int | None]] = {
    "qa": (("question", "answer"), None),
    "perturbed5": (("question", "answer", "paraphrased_answer"), 5),
    "options": (("question", "answer", "option1", "option2", "option3", "option4"), None),
    "perturbed3": (("question", "answer"), 3),
    "lines": ((), None),
}


# --------------------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir``, else ``$NPO_TOFU_DIR``; must hold ``full.json``."""
    if data_dir is None or str(data_dir) == "":
        env = os.environ.get("NPO_TOFU_DIR")
        if not env:
            raise UserError("TOFU data not found: pass --data-dir or set NPO_TOFU_DIR "
                            "(a directory holding full.json, forget10.json, ...)")
        data_dir = env
    d = Path(data_dir)
    if not (d / "full.json").is_file():
        raise UserError(f"TOFU data not found: {d} has no full.json (pass --data-dir or set NPO_TOFU_DIR)")
    return d


def _check_split(name: str) -> str:
    if name not in SPLITS:
        raise UserError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
    return SPLITS[name]


def validate_row(row, kind: str) -> str | None:
    """The problem with ``row`` for a split of ``kind``, or ``None`` when it is valid."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    fields, n_perturbed = REQUIRED[kind]
    for f in fields:
        v = row.get(f)
        if v is None:
            return f"missing field {f!r}"
        if not isinstance(v, str) or not v.strip():
            return f"field {f!r} must be a non-empty string"
    if n_perturbed is not None:
        p = row.get("perturbed_answer")
        if not isinstance(p, list):
            return "missing list field 'perturbed_answer'"
        if len(p) != n_perturbed:
            return f"'perturbed_answer' has {len(p)} answers, expected {n_perturbed}"
        if not all(isinstance(a, str) and a.strip() for a in p):
            return "'perturbed_answer' entries must be non-empty strings"
    return None


def _read_lines_file(path: Path, kind: str) -> list:
    if not path.is_file():
        raise UserError(f"TOFU split file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if kind == "lines":
                rows.append(line.strip())
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from None
            problem = validate_row(row, kind)
            if problem:
                raise UserError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def load_split(name: str, data_dir=None, source: str = "local") -> list:
    """Rows of TOFU split ``name`` (dicts; plain strings for ``idontknow``), validated."""
    kind = _check_split(name)
    if source == "hub":
        return _load_hub(name, kind)
    if source != "local":
        raise UserError(f"unknown data source {source!r}; choose 'local' or 'hub'")
    d = resolve_data_dir(data_dir)
    fname = "idontknow.jsonl" if name == "idontknow" else f"{name}.json"
    return _read_lines_file(d / fname, kind)


def _load_hub(name: str, kind: str) -> list:
    """``datasets.load_dataset("locuslab/TOFU", name)``; a clear error when the hub is unreachable."""
    if kind == "lines":
        raise UserError("idontknow is not on the hub: pass --data-dir with idontknow.jsonl")
    try:
        import datasets

        ds = datasets.load_dataset("locuslab/TOFU", name, split="train")
    except Exception as exc:  # noqa: BLE001 - any failure becomes one clear line
        raise UserError(f"could not load locuslab/TOFU {name!r} from the Hugging Face hub "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "use --data-dir with a local copy") from None
    rows = [dict(r) for r in ds]
    for i, row in enumerate(rows):
        problem = validate_row(row, kind)
        if problem:
            raise UserError(f"locuslab/TOFU/{name} row {i}: {problem}")
    return rows


# --------------------------------------------------------------------------------------------------
# tofu-mini
# --------------------------------------------------------------------------------------------------
#: mini forget split -> number of authors forgotten (out of the 20 authors of forget10)
MINI_FORGET_AUTHORS = {"forget10": 2, "forget20": 4, "forget50": 10, "forget90": 18}
MINI_RETAIN_OF = {"forget10": "retain90", "forget20": "retain80", "forget50": "retain50", "forget90": "retain10"}
MINI_N_AUTHORS = 20


# --------------------------------------------------------------------------------------------------
# validation / test questions of the eval sets
# --------------------------------------------------------------------------------------------------
QUESTION_SUBSETS = ("all", "val", "test")
#: positions (within an author's block of AUTHOR_SIZE QA) of the validation questions
VAL_POSITIONS = (0, 5, 10, 15)
#: sets that are not author blocks: every VAL_EVERY-th row (from row 0) is a validation question
VAL_EVERY = 5


def is_val_question(index: int, author_blocks: bool = True) -> bool:
    """Whether row ``index`` of an eval set is a validation question (module docstring: the rule)."""
    return index % AUTHOR_SIZE in VAL_POSITIONS if author_blocks else index % VAL_EVERY == 0


def question_subset(rows: Sequence, subset: str, author_blocks: bool = True) -> list:
    """The ``subset`` (``all``/``val``/``test``) of an eval set's rows, in order. ``author_blocks``: the
    rows are whole TOFU authors of 20 QA from an author boundary (else every 5th row is ``val``)."""
    if subset not in QUESTION_SUBSETS:
        raise UserError(f"unknown question subset {subset!r}; choose {', '.join(QUESTION_SUBSETS)}")
    if subset == "all":
        return list(rows)
    if author_blocks and len(rows) % AUTHOR_SIZE:
        raise UserError(f"an author eval set of {len(rows)} rows is not whole authors of {AUTHOR_SIZE} QA: "
                        "no val/test split")
    want = subset == "val"
    return [r for i, r in enumerate(rows) if is_val_question(i, author_blocks) == want]


def _mini_name(name: str) -> str:
    n = name[len("mini-"):] if name.startswith("mini-") else name
    return n


def mini_pool(data_dir=None) -> list[dict]:
    """The 400 QA pairs (20 authors) of ``forget10_perturbed``, in order."""
    return load_split("forget10_perturbed", data_dir)


def mini_splits(name: str, data_dir=None) -> tuple[list[dict], list[dict]]:
    """``(forget_rows, retain_rows)`` of tofu-mini ``mini-forget10/20/50/90`` (or ``forget10`` ...)."""
    key = _mini_name(name)
    if key not in MINI_FORGET_AUTHORS:
        raise UserError(f"unknown tofu-mini forget split {name!r}; valid: "
                        + ", ".join(f"mini-{k}" for k in MINI_FORGET_AUTHORS))
    pool = mini_pool(data_dir)
    cut = len(pool) - MINI_FORGET_AUTHORS[key] * AUTHOR_SIZE
    return pool[cut:], pool[:cut]


def mini_retain(name: str, data_dir=None) -> list[dict]:
    """tofu-mini ``retain90/80/50/10``: the authors of the pool not in the matching forget split."""
    key = _mini_name(name)
    inv = {v: k for k, v in MINI_RETAIN_OF.items()}
    if key not in inv:
        raise UserError(f"unknown tofu-mini retain split {name!r}; valid: "
                        + ", ".join(f"mini-{k}" for k in inv))
    return mini_splits(inv[key], data_dir)[1]


#: tofu-mini holdout: full.json authors (0-based, 20 QA each) that no tofu-mini model is trained on
MINI_HOLDOUT_AUTHORS = tuple(range(170, 180))


def mini_holdout(data_dir=None) -> list[dict]:
    """The tofu-mini holdout: ``full.json`` authors 170-179 (rows 3400-3599), the 10 authors just before
    the mini pool (authors 180-199 = ``forget10``). Question/answer rows, in order."""
    full = load_split("full", data_dir)
    a, b = MINI_HOLDOUT_AUTHORS[0] * AUTHOR_SIZE, (MINI_HOLDOUT_AUTHORS[-1] + 1) * AUTHOR_SIZE
    return [{"question": r["question"], "answer": r["answer"]} for r in full[a:b]]


def load_holdout(path) -> list[dict]:
    """Holdout rows (question/answer) from ``path``: a JSON list or JSON lines (as TOFU's files and
    open-unlearning's ``holdout01/05/10``). One-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"holdout file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{p}: not valid JSON ({exc.msg})") from None
        for i, row in enumerate(rows):
            problem = validate_row(row, "qa")
            if problem:
                raise UserError(f"{p}: row {i}: {problem}")
        if not rows:
            raise UserError(f"{p}: no rows")
    else:
        rows = _read_lines_file(p, "qa")
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def general_knowledge(data_dir=None) -> list[dict]:
    """``real_authors`` + ``world_facts`` QA (question/answer only)."""
    rows = load_split("real_authors", data_dir) + load_split("world_facts", data_dir)
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def mini_finetune_corpus(split: str, data_dir=None) -> list[dict]:
    """The tofu-mini fine-tuning corpus: ``full`` (all 20 authors) or ``retainYY``, plus general QA."""
    key = _mini_name(split)
    authors = mini_pool(data_dir) if key == "full" else mini_retain(key, data_dir)
    return [{"question": r["question"], "answer": r["answer"]} for r in authors] + general_knowledge(data_dir)


def forget_retain(forget: str, retain: str, preset: str | None, data_dir=None) -> tuple[list[dict], list[dict]]:
    """The forget and retain rows of an unlearning run (``preset`` ``None``/"tofu" or "mini")."""
    if preset == "mini":
        f_rows, r_default = mini_splits(forget, data_dir)
        r_rows = r_default if _mini_name(retain) == MINI_RETAIN_OF.get(_mini_name(forget)) \
            else mini_retain(retain, data_dir)
    elif preset in (None, "tofu"):
        if not re.fullmatch(r"forget\d\d", forget):
            raise UserError(f"--forget must be a forgetXX split, got {forget!r}")
        if not re.fullmatch(r"retain\d\d", retain):
            raise UserError(f"--retain must be a retainYY split, got {retain!r}")
        f_rows, r_rows = load_split(forget, data_dir), load_split(retain, data_dir)
    else:
        raise UserError(f"unknown preset {preset!r}; choose 'tofu' or 'mini'")
    if not f_rows:
        raise UserError(f"forget set {forget!r} is empty")
    if not r_rows:
        raise UserError(f"retain set {retain!r} is empty")
    overlap = {r["question"] for r in f_rows} & {r["question"] for r in r_rows}
    if overlap:
        raise UserError(f"forget set {forget!r} and retain set {retain!r} share {len(overlap)} questions")
    return f_rows, r_rows


# --------------------------------------------------------------------------------------------------
# split naming (the one home of these rules)
# --------------------------------------------------------------------------------------------------
def retain_of(forget: str) -> str:
    """The complement of a forget split: ``forget10`` (or ``mini-forget10``) -> ``retain90``."""
    pct = forget.removeprefix("mini-").removeprefix("forget")
    if not (pct.isdigit() and len(pct) == 2):
        raise UserError(f"forget split must look like forgetXX, got {forget!r}")
    return f"retain{100 - int(pct):02d}"


def eval_split(forget: str, preset: str | None) -> str:
    """The eval split of an unlearning run on ``forget``: ``mini-forgetXX`` under the mini preset."""
    if preset == "mini" and not forget.startswith("mini-"):
        return f"mini-{forget}"
    return forget


# --------------------------------------------------------------------------------------------------
# pairing (seeded, reproducible)
# --------------------------------------------------------------------------------------------------
def pair_retain(n_forget: int, n_retain: int, seed: int, epoch: int) -> list[int]:
    """Retain index paired with each forget example in ``epoch``.

    A seeded permutation of the retain set per epoch (cycled when the forget set is larger), so the
    same (seed, epoch) always gives the same pairs and each epoch sees different retain examples.
    """
    if n_forget <= 0 or n_retain <= 0:
        raise UserError(f"cannot pair {n_forget} forget with {n_retain} retain examples")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    out: list[int] = []
    while len(out) < n_forget:
        out.extend(torch.randperm(n_retain, generator=g).tolist())
    return out[:n_forget]


def pair_idk(n_forget: int, n_idk: int, seed: int) -> list[int]:
    """IDK answer index for each forget example: fixed for the run, so its reference log-prob caches."""
    g = torch.Generator().manual_seed(int(seed) * 7_919 + 17)
    return torch.randint(n_idk, (n_forget,), generator=g).tolist()


# --------------------------------------------------------------------------------------------------
# prompt formats and tokenisation
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt; the answer text is ``answer_prefix + answer`` after it."""

    name: str
    template: str = "{question}"
    answer_prefix: str = " "
    use_chat_template: bool = False
    #: tokenise prompt + answer as one string (a dialect's ``tokenization="joined"``), masking the prompt's
    #: own token count; False: the two are tokenised apart (see :mod:`full_scale.dialects`)
    joined: bool = False
    #: (joined) mask ``len(tokens(prompt + answer_prefix))`` positions, open-unlearning's count, which is one
    #: answer token too many when the prefix's trailing space merges into the answer's first token
    mask_prefix_with_prompt: bool = False

    def render(self, question: str, tokenizer=None) -> str:
        if self.use_chat_template:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise UserError("prompt format 'chat-template' needs a tokenizer with a chat template")
            return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                 tokenize=False, add_generation_prompt=True)
        return self.template.format(question=question)


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "llama2-chat": PromptFormat("llama2-chat", "[INST] {question} [/INST]", " "),
    "phi": PromptFormat("phi", "Question: {question}\nAnswer:", " "),
    "chat-template": PromptFormat("chat-template", answer_prefix="", use_chat_template=True),
    "plain": PromptFormat("plain", "Q: {question}\nA:", " "),
}


def get_format(fmt: str | PromptFormat) -> PromptFormat:
    if isinstance(fmt, PromptFormat):
        return fmt
    if fmt not in PROMPT_FORMATS:
        raise UserError(f"unknown prompt format {fmt!r}; valid: {', '.join(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[fmt]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, question: str, fmt: str | PromptFormat) -> list[int]:
    """``[BOS] prompt`` token ids, exactly as :func:`encode_qa` starts (use for generation)."""
    f = get_format(fmt)
    return _with_bos(tokenizer, _ids(tokenizer, f.render(question, tokenizer)))


def encode_answer(tokenizer, answer: str, fmt: str | PromptFormat) -> list[int]:
    """Answer token ids followed by EOS (all of them are targets)."""
    f = get_format(fmt)
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token")
    return _ids(tokenizer, f.answer_prefix + answer) + [tokenizer.eos_token_id]


def encode_qa(tokenizer, question: str, answer: str, fmt: str | PromptFormat, max_length: int = 512) -> dict:
    """1-D ``input_ids``, ``attention_mask``, ``labels`` for one QA pair (labels -100 on the prompt).

    Separate tokenisation (the default): ``[BOS] prompt`` then ``answer_prefix + answer + EOS``. Joined
    (``fmt.joined``, tofu's ``convert_raw_data_to_model_format``): ``[BOS] (prompt + answer_prefix +
    answer)`` tokenised as one string, EOS appended, and the first ``len([BOS] prompt)`` labels masked
    (``fmt.mask_prefix_with_prompt``: ``len([BOS] (prompt + answer_prefix))``, open-unlearning's count).
    Too-long examples lose answer tokens from the right; an example with no answer token left is an
    error.
    """
    f = get_format(fmt)
    if f.joined:
        ids, n_prompt = _encode_joined(tokenizer, question, answer, f)
    else:
        p = encode_prompt(tokenizer, question, f)
        ids, n_prompt = p + encode_answer(tokenizer, answer, f), len(p)
    ids = ids[:max_length]
    if len(ids) <= n_prompt:
        raise UserError(f"prompt of {n_prompt} tokens leaves no answer token within max_length={max_length}")
    labels = torch.tensor([IGNORE_INDEX] * n_prompt + ids[n_prompt:], dtype=torch.long)
    ids = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _encode_joined(tokenizer, question: str, answer: str, f: PromptFormat) -> tuple[list[int], int]:
    """``([BOS] tokens(prompt + answer_prefix + answer) + [EOS], number of masked prompt positions)``."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token")
    prompt = f.render(question, tokenizer)
    ids = _with_bos(tokenizer, _ids(tokenizer, prompt + f.answer_prefix + answer)) + [tokenizer.eos_token_id]
    masked = prompt + f.answer_prefix if f.mask_prefix_with_prompt else prompt
    return ids, len(_with_bos(tokenizer, _ids(tokenizer, masked)))


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids


def pad_batch(examples: Sequence[dict], pad_id: int, side: str = "right") -> dict:
    """Stack encoded examples to ``(B, T)``; padding has ``attention_mask`` 0 and ``labels`` -100."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not examples:
        raise ValueError("pad_batch: no examples")
    T = max(int(e["input_ids"].shape[0]) for e in examples)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key, value in fill.items():
        rows = []
        for e in examples:
            x = e[key]
            pad = torch.full((T - x.shape[0],), value, dtype=x.dtype)
            rows.append(torch.cat([x, pad]) if side == "right" else torch.cat([pad, x]))
        out[key] = torch.stack(rows)
    return out


def encode_rows(tokenizer, rows: Sequence[dict], fmt, max_length: int = 512, answer_key: str = "answer") -> list[dict]:
    """:func:`encode_qa` over rows (``answer_key`` picks e.g. ``paraphrased_answer``)."""
    return [encode_qa(tokenizer, r["question"], r[answer_key], fmt, max_length) for r in rows]
