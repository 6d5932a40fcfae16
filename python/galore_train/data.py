"""Training data: the built-in default dataset and tokenizer, user data loading, tokenisation, batching.

Default data
    :func:`prepare_default_data` writes a deterministic, seeded instruction dataset (seven tiny tasks a
    few-million-parameter model learns in CPU minutes), trains a byte-level BPE tokenizer on its train
    split and saves it as a Hugging Face tokenizer folder. Everything is a pure function of
    ``(seed, n_train, n_eval, vocab_size, FORMAT_VERSION)``: the same arguments give byte-identical
    files. Files are written atomically and ``manifest.json`` (written last, holding the arguments and the
    SHA-256 of every file) marks a complete, valid preparation, so a second call is a cheap no-op and a
    crash part-way leaves a folder that the next call simply rebuilds.

User data
    :func:`load_records` reads ``.json`` (a list of objects, or ``{"data": [...]}``) or ``.jsonl`` (one
    object per line). A record is one of

    * ``{"text": str}``: plain language modelling, every token is a target;
    * ``{"instruction": str, "input": str (optional), "output": str}``: loss on the response only;
    * ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: loss on the
      assistant turns only.

    When a record carries the keys of several formats, ``messages`` wins over ``instruction``/``output``,
    which win over ``text`` (Alpaca dumps carry a pre-rendered ``text`` beside the fields).

Templates
    Instruction records are rendered with :data:`PROMPT_TEMPLATE` / :data:`PROMPT_TEMPLATE_NO_INPUT`
    (prompt, masked) followed by ``output`` + EOS (the targets). Chat records use the tokenizer's own
    ``chat_template`` when it has one; otherwise the fallback layout, which is also what the default
    tokenizer's template renders::

        <|system|>\\n{content}<eos><|user|>\\n{content}<eos><|assistant|>\\n{content}<eos>

    (``<|user|>`` etc. are plain text for a tokenizer that does not know them.) No BOS token is
    prepended in any format (the Qwen2 convention); a chat template that wants one renders it itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from .atomic import write_atomic

IGNORE_INDEX = -100
FORMAT_VERSION = 1  # bump whenever the generated data or tokenizer layout changes

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
# Ids 0..4 of the default tokenizer, in this order. EOS doubles as BOS (never prepended); padding has
# its own id so a padded position can never be mistaken for a trained end-of-text token.
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
CHAT_ROLES = ("system", "user", "assistant")

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n### Response:\n"

# The default tokenizer's chat template: each turn is "<|role|>\n" + content + "<|endoftext|>"; the
# generation prompt is "<|assistant|>\n". The model thus learns to end its turn with EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}<|endoftext|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "manifest.json"

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A problem with a data file the user must fix; the message names the file and the record."""


# ============================================================================ default dataset
@dataclass(frozen=True)
class PreparedData:
    train_path: Path
    eval_path: Path
    tokenizer_dir: Path


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# A fixed made-up lexicon (not drawn from the RNG, so it is the same for every seed).
COLOR_WORDS = {
    "red": "zib", "blue": "mork", "green": "tallo", "yellow": "quen", "black": "vesh",
    "white": "plim", "orange": "drav", "purple": "snoo", "pink": "gleb", "brown": "huft",
}


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _task_reverse(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 3, 6)
    instr = rng.choice(("Reverse the word.", "Write the word backwards.", "Spell the word in reverse."))
    return instr, w, w[::-1]


def _task_upper(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 3, 6)
    instr = rng.choice(("Uppercase the word.", "Write the word in capital letters."))
    return instr, w, w.upper()


def _task_sort(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 3, 6)
    instr = rng.choice(("Sort the letters of the word.", "Put the letters in alphabetical order."))
    return instr, w, "".join(sorted(w))


def _task_add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    instr = rng.choice(("Add the two numbers.", "What is the sum?"))
    return instr, f"{a} + {b}", str(a + b)


def _task_repeat(rng: random.Random) -> tuple[str, str, str]:
    w, n = _word(rng, 2, 4), rng.randint(2, 4)
    return f"Repeat the word {n} times.", w, " ".join([w] * n)


def _task_successor(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(1000)
    instr = rng.choice(("What number comes after {n}?", "Say the number after {n}."))
    return instr.format(n=n), "", str(n + 1)


def _task_color(rng: random.Random) -> tuple[str, str, str]:
    color = rng.choice(sorted(COLOR_WORDS))
    instr = rng.choice(("Translate the color into Zorbish.", "What is this color in Zorbish?"))
    return instr, color, COLOR_WORDS[color]


_TASKS = (_task_reverse, _task_upper, _task_sort, _task_add, _task_repeat, _task_successor, _task_color)


def _generate(rng: random.Random, n: int, exclude: Optional[set] = None) -> list[dict]:
    """``n`` records, the tasks in equal shares (±1), shuffled. With ``exclude``, a record whose content
    is in it is redrawn (a few tries: tasks with a tiny content space, like colors, must repeat)."""
    tasks = [_TASKS[i % len(_TASKS)] for i in range(n)]
    rng.shuffle(tasks)
    out = []
    for task in tasks:
        for _ in range(20):
            instr, inp, outp = task(rng)
            if exclude is None or (instr, inp) not in exclude:
                break
        out.append({"instruction": instr, "input": inp, "output": outp})
    return out


def generate_default_records(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """The default train and eval records. Eval comes from its own seed stream and avoids the train
    split's (instruction, input) pairs where the task's content space allows."""
    train = _generate(random.Random(f"galore-train/v{FORMAT_VERSION}/{seed}/train"), n_train)
    seen = {(r["instruction"], r["input"]) for r in train}
    evals = _generate(random.Random(f"galore-train/v{FORMAT_VERSION}/{seed}/eval"), n_eval, exclude=seen)
    return train, evals


def _jsonl_bytes(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def build_default_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``.

    Special tokens (ids 0..4): ``<|endoftext|>`` (EOS, also BOS; never prepended), ``<|pad|>``,
    ``<|system|>``, ``<|user|>``, ``<|assistant|>``; chat template :data:`DEFAULT_CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


def _manifest(seed: int, n_train: int, n_eval: int, vocab_size: int) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval, "vocab_size": vocab_size}


def default_data_ready(data_dir: PathLike, *, seed: int = 0, n_train: int = 4000, n_eval: int = 256, vocab_size: int = 384) -> bool:
    """True when ``data_dir`` holds a complete preparation for exactly these arguments whose files are
    unchanged since (their SHA-256 match the manifest's)."""
    data_dir = Path(data_dir)
    try:
        manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or {k: manifest.get(k) for k in _manifest(0, 0, 0, 0)} != _manifest(seed, n_train, n_eval, vocab_size):
        return False
    try:
        files = {TRAIN_FILE: _sha256(data_dir / TRAIN_FILE), EVAL_FILE: _sha256(data_dir / EVAL_FILE)}
        tok_dir = data_dir / TOKENIZER_DIR
        files.update({f"{TOKENIZER_DIR}/{k}": v for k, v in _tree_hashes(tok_dir).items()} if tok_dir.is_dir() else {})
    except OSError:
        return False
    return manifest.get("files") == files


def prepare_default_data(data_dir: PathLike, *, seed: int = 0, n_train: int = 4000, n_eval: int = 256, vocab_size: int = 384) -> PreparedData:
    """Write ``train.jsonl``, ``eval.jsonl``, ``tokenizer/`` and ``manifest.json`` under ``data_dir``
    (a no-op when :func:`default_data_ready`). ``data_dir`` belongs to this function: those names are
    overwritten."""
    data_dir = Path(data_dir)
    prepared = PreparedData(data_dir / TRAIN_FILE, data_dir / EVAL_FILE, data_dir / TOKENIZER_DIR)
    if default_data_ready(data_dir, seed=seed, n_train=n_train, n_eval=n_eval, vocab_size=vocab_size):
        return prepared
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be positive, got {n_train} and {n_eval}")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MANIFEST_FILE).unlink(missing_ok=True)  # invalid until everything below is in place

    train, evals = generate_default_records(seed, n_train, n_eval)
    tokenizer = build_default_tokenizer((_render_instruction(r)[0] + r["output"] for r in train), vocab_size)
    write_atomic(prepared.train_path, _jsonl_bytes(train))
    write_atomic(prepared.eval_path, _jsonl_bytes(evals))

    # The tokenizer folder: saved into a fresh temporary folder, then swapped in with a rename.
    tmp_dir = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{TOKENIZER_DIR}.", suffix=".tmp"))
    try:
        tokenizer.save_pretrained(str(tmp_dir))
        if prepared.tokenizer_dir.exists():
            old = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{TOKENIZER_DIR}.", suffix=".old"))
            os.replace(prepared.tokenizer_dir, old / TOKENIZER_DIR)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp_dir, prepared.tokenizer_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    manifest = _manifest(seed, n_train, n_eval, vocab_size)
    manifest["files"] = {
        TRAIN_FILE: _sha256(prepared.train_path),
        EVAL_FILE: _sha256(prepared.eval_path),
        **{f"{TOKENIZER_DIR}/{k}": v for k, v in _tree_hashes(prepared.tokenizer_dir).items()},
    }
    write_atomic(data_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return prepared


# ============================================================================ loading user data
def record_format(record: Any) -> str:
    """``"chat"``, ``"instruction"`` or ``"text"`` (precedence in that order); DataError otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(
        f"unknown record format (keys: {keys}); use {{\"text\": ...}}, "
        "{\"instruction\": ..., \"input\": ..., \"output\": ...} or {\"messages\": [{\"role\": ..., \"content\": ...}]}"
    )


def _validate(record: Any) -> str:
    fmt = record_format(record)
    if fmt == "text":
        if not isinstance(record["text"], str) or not record["text"]:
            raise DataError("\"text\" must be a non-empty string")
    elif fmt == "instruction":
        for key in ("instruction", "output"):
            if key not in record:
                raise DataError(f"instruction record is missing \"{key}\"; it needs \"instruction\" and \"output\" (\"input\" is optional)")
            if not isinstance(record[key], str):
                raise DataError(f"\"{key}\" must be a string, got {type(record[key]).__name__}")
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise DataError(f"\"input\" must be a string (or absent), got {type(record['input']).__name__}")
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError("\"messages\" must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
        for j, m in enumerate(messages, 1):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"message {j} must be an object with \"role\" and \"content\"")
            if m["role"] not in CHAT_ROLES:
                raise DataError(f"message {j} has role {m['role']!r}; roles are {', '.join(CHAT_ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"message {j}'s \"content\" must be a string, got {type(m['content']).__name__}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("the conversation has no \"assistant\" message, so nothing to train on; add one or drop the record")
    return fmt


def load_records(path: PathLike) -> list[dict]:
    """The records of a ``.json`` or ``.jsonl`` file, each validated (see the module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use .json (a list of objects) or .jsonl (one object per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file: {err.strerror}") from None

    located: list[tuple[str, Any]] = []  # (where, record)
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {lineno}: invalid JSON ({err.msg}, column {err.colno}); "
                    "each line of a .jsonl file must be one complete JSON object"
                ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON ({err.msg}, line {err.lineno} column {err.colno}); fix the syntax, or use .jsonl for one object per line") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records or {{\"data\": [...]}}, got {type(data).__name__}")
        located = [(f"record {i}", r) for i, r in enumerate(data, 1)]
    if not located:
        raise DataError(f"{path}: the file holds no records; add at least one")
    for where, record in located:
        try:
            _validate(record)
        except DataError as err:
            raise DataError(f"{path}: {where}: {err}") from None
    return [r for _, r in located]


# ============================================================================ tokenisation
def load_tokenizer(path: PathLike):
    """``AutoTokenizer.from_pretrained(path)`` with a pad token guaranteed (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f"{path}: the tokenizer has neither a pad nor an eos token; set eos_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _render_instruction(record: dict) -> tuple[str, str]:
    """(prompt, response text without EOS)."""
    inp = record.get("input") or ""
    if inp:
        prompt = PROMPT_TEMPLATE.format(instruction=record["instruction"], input=inp)
    else:
        prompt = PROMPT_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])
    return prompt, record["output"]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; set eos_token in its tokenizer_config.json")
    return int(eos)


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_chat_template(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    full = _render_chat(tokenizer, messages, False)
    spans = []  # character spans of the full rendering that are targets
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prefix = _render_chat(tokenizer, messages[:i], True) if i else _render_chat(tokenizer, [], True)
        except Exception:  # some templates refuse an empty conversation
            prefix = ""
        through = _render_chat(tokenizer, messages[: i + 1], False)
        if through.startswith(prefix) and full.startswith(through) and len(prefix) >= cursor:
            spans.append((len(prefix), len(through)))
            cursor = len(through)
        else:
            # The template renders earlier turns differently once later ones exist: fall back to
            # finding the content itself (plus an EOS right after it) in the full rendering.
            start = full.find(m["content"], cursor)
            if start < 0:
                raise DataError("the tokenizer's chat_template drops an assistant message's content; cannot locate the targets")
            end = start + len(m["content"])
            if tokenizer.eos_token and full.startswith(tokenizer.eos_token, end):
                end += len(tokenizer.eos_token)
            spans.append((start, end))
            cursor = end
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("chat records with a chat_template need a fast (tokenizers-backed) tokenizer")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        # A token is a target when it starts inside a target span.
        if any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels


def _encode_chat_fallback(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for m in record["messages"]:
        header = _ids(tokenizer, f"<|{m['role']}|>\n")
        body = _ids(tokenizer, m["content"]) + [eos]
        ids += header + body
        labels += [IGNORE_INDEX] * len(header) + (body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body))
    return ids, labels


def _pieces(record: dict, fmt: str) -> list[tuple[str, bool]]:
    """Text and instruction records as (text, is_target) pieces, each tokenised on its own and
    followed, for the last piece, by EOS (a target)."""
    if fmt == "text":
        return [(record["text"], True)]
    prompt, response = _render_instruction(record)
    return [(prompt, False), (response, True)]


def _assemble(pieces: list[tuple[str, bool]], piece_ids: list[list[int]], eos: int) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for (_, target), p in zip(pieces, piece_ids):
        ids += p
        labels += p if target else [IGNORE_INDEX] * len(p)
    return ids + [eos], labels + [eos]


def _encode_many(records: list[dict], tokenizer, *, numbered: bool = False) -> list[tuple[list[int], list[int]]]:
    """Untruncated (ids, labels) for each record; text and instruction pieces in one batched call.
    With ``numbered``, a DataError names the record (1-based)."""
    out: list[Optional[tuple[list[int], list[int]]]] = [None] * len(records)
    plain: list[tuple[int, list[tuple[str, bool]]]] = []
    for i, record in enumerate(records):
        try:
            fmt = _validate(record)
            if fmt == "chat":
                chat_template = getattr(tokenizer, "chat_template", None)
                out[i] = _encode_chat_template(record, tokenizer) if chat_template else _encode_chat_fallback(record, tokenizer)
            else:
                plain.append((i, _pieces(record, fmt)))
        except DataError as err:
            if not numbered:
                raise
            raise DataError(f"record {i + 1}: {err}") from None
    if plain:
        eos = _eos_id(tokenizer)
        texts = [text for _, pieces in plain for text, _ in pieces]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for i, pieces in plain:
            # An empty piece (e.g. an empty "output") tokenises to nothing.
            out[i] = _assemble(pieces, [list(next(encoded)) for _ in pieces], eos)
    return out  # type: ignore[return-value]


def encode_record(record: dict, tokenizer, max_seq_len: int) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}``, equal length, at most ``max_seq_len`` (the start is kept); labels
    are ``-100`` on non-target tokens and are NOT shifted."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    ((ids, labels),) = _encode_many([record], tokenizer)
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]}


class TokenizedDataset(torch.utils.data.Dataset):
    """Records encoded once, up front. Records left with no target token after truncation are
    dropped (``dropped`` counts them, ``truncated`` counts every record cut to ``max_seq_len``);
    ``num_target_tokens`` is the total of labels != -100 over the kept examples."""

    def __init__(self, records: list[dict], tokenizer, max_seq_len: int):
        self.examples: list[dict[str, list[int]]] = []
        self.dropped = 0
        self.truncated = 0
        self.num_target_tokens = 0
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        for ids, labels in _encode_many(list(records), tokenizer, numbered=True):
            if len(ids) > max_seq_len:
                self.truncated += 1
            ex = {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]}
            targets = sum(1 for t in ex["labels"] if t != IGNORE_INDEX)
            if targets == 0:
                self.dropped += 1
                continue
            self.num_target_tokens += targets
            self.examples.append(ex)
        self.lengths = [len(ex["input_ids"]) for ex in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` (pad_token_id), ``attention_mask`` (0 on
    padding), ``labels`` (-100 on padding); all ``(B, L)`` int64. Labels are not shifted."""
    if not batch:
        raise ValueError("collate got an empty batch")
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (load the tokenizer with load_tokenizer)")
    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"example {row}: input_ids and labels differ in length ({n} vs {len(ex['labels'])})")
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
