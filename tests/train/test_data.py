"""galore_train.data: the default dataset and tokenizer, record loading, encoding, batching."""
from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch

from galore_train import data as D
from galore_train.data import (
    IGNORE_INDEX,
    DataError,
    PreparedData,
    TokenizedDataset,
    collate,
    default_data_ready,
    encode_record,
    load_records,
    load_tokenizer,
    prepare_default_data,
    record_format,
)

SMALL = dict(n_train=300, n_eval=40, vocab_size=320)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> PreparedData:
    """The real default preparation (default sizes and vocabulary), made once for the module."""
    return prepare_default_data(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def tok(default_data):
    return load_tokenizer(default_data.tokenizer_dir)


# ------------------------------------------------------------------------------ default data
def test_prepare_is_deterministic_per_seed(tmp_path):
    a = prepare_default_data(tmp_path / "a", seed=3, **SMALL)
    b = prepare_default_data(tmp_path / "b", seed=3, **SMALL)
    c = prepare_default_data(tmp_path / "c", seed=4, **SMALL)
    assert a.train_path == tmp_path / "a" / "train.jsonl" and a.eval_path == tmp_path / "a" / "eval.jsonl"
    assert a.train_path.read_bytes() == b.train_path.read_bytes()
    assert a.eval_path.read_bytes() == b.eval_path.read_bytes()
    assert _files(a.tokenizer_dir) == _files(b.tokenizer_dir)
    assert "tokenizer.json" in _files(a.tokenizer_dir)
    ta, tb = load_tokenizer(a.tokenizer_dir), load_tokenizer(b.tokenizer_dir)
    text = "### Instruction:\nReverse the word.\nqwerty <|user|> 12 + 34 Zorbish"
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
    assert a.train_path.read_bytes() != c.train_path.read_bytes()
    assert a.eval_path.read_bytes() != c.eval_path.read_bytes()
    # The record counts are the ones asked for.
    assert len(load_records(a.train_path)) == SMALL["n_train"]
    assert len(load_records(a.eval_path)) == SMALL["n_eval"]


def test_second_prepare_is_a_noop_and_stale_data_is_rebuilt(tmp_path):
    d = tmp_path / "d"
    first = prepare_default_data(d, seed=1, **SMALL)
    assert default_data_ready(d, seed=1, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    assert prepare_default_data(d, seed=1, **SMALL) == first
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == stamps

    # Other arguments: not ready, and a call rebuilds for them.
    assert not default_data_ready(d, seed=2, **SMALL)
    assert not default_data_ready(d, seed=1, **{**SMALL, "vocab_size": 330})
    assert not default_data_ready(d, seed=1, **{**SMALL, "n_eval": 41})
    prepare_default_data(d, seed=1, **{**SMALL, "vocab_size": 330})
    assert len(load_tokenizer(first.tokenizer_dir)) == 330
    assert not default_data_ready(d, seed=1, **SMALL)

    # A file edited after preparation, or a missing manifest (a crash before it was written): rebuilt.
    prepare_default_data(d, seed=1, **SMALL)
    good = first.train_path.read_bytes()
    first.train_path.write_bytes(good[: len(good) // 2])
    assert not default_data_ready(d, seed=1, **SMALL)
    prepare_default_data(d, seed=1, **SMALL)
    assert first.train_path.read_bytes() == good
    (d / "manifest.json").unlink()
    assert not default_data_ready(d, seed=1, **SMALL)
    prepare_default_data(d, seed=1, **SMALL)
    assert default_data_ready(d, seed=1, **SMALL)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["seed"] == 1 and manifest["format_version"] == D.FORMAT_VERSION
    assert not [p for p in d.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_a_crash_leaves_no_half_file_and_no_manifest(tmp_path, monkeypatch):
    d = tmp_path / "d"
    prepare_default_data(d, seed=0, **SMALL)
    before = (d / "train.jsonl").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    # A failure at the final rename of a file: the old file is intact, no temporary file remains.
    monkeypatch.setattr(D.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare_default_data(d, seed=5, **SMALL)
    monkeypatch.undo()
    assert (d / "train.jsonl").read_bytes() == before
    assert not (d / "manifest.json").exists()
    assert not default_data_ready(d, seed=0, **SMALL) and not default_data_ready(d, seed=5, **SMALL)
    assert not [p for p in d.iterdir() if p.name.startswith(".")]

    # A failure while saving the tokenizer: no manifest, so the next call rebuilds completely.
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(OSError):
        prepare_default_data(d, seed=5, **SMALL)
    monkeypatch.undo()
    assert not (d / "manifest.json").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
    prepare_default_data(d, seed=5, **SMALL)
    assert default_data_ready(d, seed=5, **SMALL)
    assert _files(d) == _files(prepare_default_data(tmp_path / "fresh", seed=5, **SMALL).train_path.parent)


def _check_answer(r: dict) -> str:
    """The task a default record belongs to, after checking its output is right."""
    ins, inp, out = r["instruction"], r["input"], r["output"]
    if "everse" in ins or "backwards" in ins:
        assert out == inp[::-1]
        return "reverse"
    if "Uppercase" in ins or "capital" in ins:
        assert out == inp.upper()
        return "upper"
    if "Sort" in ins or "alphabetical" in ins:
        assert out == "".join(sorted(inp))
        return "sort"
    if "sum" in ins or "Add" in ins:
        a, b = inp.split(" + ")
        assert int(out) == int(a) + int(b) and 0 <= int(a) < 100 and 0 <= int(b) < 100
        return "add"
    if ins.startswith("Repeat"):
        n = int(ins.split()[3])
        assert out == " ".join([inp] * n)
        return "repeat"
    if "after" in ins:
        assert inp == "" and int(out) == int(ins.rstrip("?.").split()[-1]) + 1
        return "successor"
    if "Zorbish" in ins:
        assert out == D.COLOR_WORDS[inp]
        return "color"
    raise AssertionError(f"unknown task: {r}")


def test_default_records_are_correct_mixed_evenly_and_eval_is_disjoint(default_data):
    train, evals = load_records(default_data.train_path), load_records(default_data.eval_path)
    assert all(set(r) == {"instruction", "input", "output"} for r in train + evals)
    counts = Counter(_check_answer(r) for r in train)
    assert len(counts) == 7 and max(counts.values()) - min(counts.values()) <= 1, counts
    assert len(Counter(_check_answer(r) for r in evals)) == 7
    seen = {(r["instruction"], r["input"]) for r in train}
    overlap = [r for r in evals if (r["instruction"], r["input"]) in seen]
    # Only the colour task (20 possible prompts) has to repeat prompts seen in training.
    assert all(_check_answer(r) == "color" for r in overlap), overlap[:3]
    # Records are not in task order.
    assert len({_check_answer(r) for r in train[:7]}) < 7 or len({_check_answer(r) for r in train[7:14]}) < 7


def test_default_records_fit_in_64_tokens(default_data, tok):
    for path in (default_data.train_path, default_data.eval_path):
        ds = TokenizedDataset(load_records(path), tok, max_seq_len=128)
        lengths = ds.lengths
        mean, longest = statistics.mean(lengths), max(lengths)
        print(f"{path.name}: {len(lengths)} records, tokens mean {mean:.1f}, min {min(lengths)}, max {longest}")
        assert ds.dropped == 0 and ds.truncated == 0
        assert longest <= 64
        assert 15 <= mean <= 60


# ------------------------------------------------------------------------------ tokenizer
def test_default_tokenizer_round_trip_and_special_tokens(default_data, tok, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = AutoTokenizer.from_pretrained(str(default_data.tokenizer_dir))
    assert len(auto) == len(tok) == 384
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.bos_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == D.DEFAULT_CHAT_TEMPLATE == auto.chat_template
    special = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in special]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 5
    assert tok("<|user|>\nhi<|endoftext|>", add_special_tokens=False)["input_ids"][0] == ids[3][0]
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]  # no BOS added

    for r in load_records(default_data.eval_path)[:100]:
        prompt, _ = D._render_instruction(r)
        text = prompt + r["output"]
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for text in ["  two  spaces, tabs\tand\nnewlines ", "ünïcödé ✓ 😀", "x = [1, 2]; y += 3"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # The template's fixed words are merged: a default prompt costs far fewer tokens than bytes.
    prompt = D.PROMPT_TEMPLATE.format(instruction="Reverse the word.", input="abc")
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) < len(prompt) / 2


def test_load_tokenizer_falls_back_to_eos_for_padding(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(str(tmp_path / "t"))
    config_path = tmp_path / "t" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["pad_token"]
    config_path.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "t")).pad_token is None
    loaded = load_tokenizer(tmp_path / "t")
    assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id == loaded.eos_token_id


# ------------------------------------------------------------------------------ encoding
def _targets(ex):
    return [t for t in ex["labels"] if t != IGNORE_INDEX]


def test_encode_instruction_masks_exactly_the_prompt(tok):
    rec = {"instruction": "Reverse the word.", "input": "abcd", "output": "dcba"}
    ex = encode_record(rec, tok, 128)
    prompt = "### Instruction:\nReverse the word.\n### Input:\nabcd\n### Response:\n"
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert IGNORE_INDEX not in ex["labels"][n:]
    assert ex["input_ids"][-1] == ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][:n]) == prompt
    assert tok.decode(_targets(ex)) == "dcba<|endoftext|>"
    assert tok.decode(ex["input_ids"]) == prompt + "dcba<|endoftext|>"

    # No input (empty, None or absent): the template has no Input section.
    for variant in ({"input": ""}, {"input": None}, {}):
        r = {"instruction": "What number comes after 5?", "output": "6", **variant}
        e = encode_record(r, tok, 128)
        assert "Input" not in tok.decode(e["input_ids"])
        assert tok.decode(e["input_ids"]).startswith("### Instruction:\nWhat number comes after 5?\n### Response:\n")
        assert tok.decode(_targets(e)) == "6<|endoftext|>"
    assert record_format(rec) == "instruction"


def test_encode_text_trains_every_token(tok):
    ex = encode_record({"text": "hello world"}, tok, 128)
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"]) == "hello world<|endoftext|>"
    assert record_format({"text": "x"}) == "text"


CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse abc"},
        {"role": "assistant", "content": "cba"},
        {"role": "user", "content": "And xy?"},
        {"role": "assistant", "content": " y x\nok "},
    ]
}


def _labelled_runs(ex) -> list[list[int]]:
    runs, current = [], []
    for t in ex["labels"]:
        if t == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    return runs + ([current] if current else [])


def test_encode_chat_labels_only_assistant_turns(tok):
    assert record_format(CONVERSATION) == "chat"
    ex = encode_record(CONVERSATION, tok, 256)
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    runs = [tok.decode(r) for r in _labelled_runs(ex)]
    assert runs == ["cba<|endoftext|>", " y x\nok <|endoftext|>"]
    assert all(t == i for t, i in zip(ex["labels"], ex["input_ids"]) if t != IGNORE_INDEX)

    # Without a chat template: the documented fallback layout, which the default template matches.
    bare = load_tokenizer(Path(tok.name_or_path))
    bare.chat_template = None
    assert encode_record(CONVERSATION, bare, 256) == ex


def test_encode_chat_with_other_templates(tok):
    # ChatML-like: a newline after each turn's end token (labelled with the turn).
    chatml = load_tokenizer(Path(tok.name_or_path))
    chatml.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}<|endoftext|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    ex = encode_record(CONVERSATION, chatml, 256)
    assert [chatml.decode(r) for r in _labelled_runs(ex)] == ["cba<|endoftext|>\n", " y x\nok <|endoftext|>\n"]
    # A template that renders the last turn differently (not prefix-stable): the content and its EOS.
    odd = load_tokenizer(Path(tok.name_or_path))
    odd.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}\n{{ m['content'] }}"
        "{% if loop.last %} (end){% endif %}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    ex = encode_record(CONVERSATION, odd, 256)
    assert [odd.decode(r) for r in _labelled_runs(ex)] == ["cba<|endoftext|>", " y x\nok "]


def test_truncation_keeps_the_start_and_drops_records_without_targets(tok):
    rec = {"instruction": "Repeat the word 4 times.", "input": "abc", "output": "abc abc abc abc"}
    full = encode_record(rec, tok, 1000)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    cut = encode_record(rec, tok, n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 2] and cut["labels"] == full["labels"][: n_prompt + 2]
    assert len(_targets(cut)) == 2
    none = encode_record(rec, tok, n_prompt)
    assert len(none["input_ids"]) == n_prompt and _targets(none) == []

    long_text = {"text": " ".join("abcdefghijklmnopqrstuvwxyz")}
    assert len(encode_record(long_text, tok, 1000)["input_ids"]) > n_prompt
    records = [rec, long_text, {"instruction": "x", "output": "y"}]
    ds = TokenizedDataset(records, tok, max_seq_len=n_prompt)
    # rec loses every target (dropped); the text is cut (kept); the short record fits.
    assert ds.dropped == 1 and len(ds) == 2 and ds.truncated == 2
    assert ds.num_target_tokens == sum(len(_targets(ds[i])) for i in range(len(ds)))
    assert ds[0] == encode_record(records[1], tok, n_prompt)
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(len(ds))]
    with pytest.raises(DataError, match="record 2"):
        TokenizedDataset([rec, {"instruction": "no output"}], tok, 64)


def test_dataset_matches_per_record_encoding(default_data, tok):
    records = load_records(default_data.eval_path)[:50] + [CONVERSATION, {"text": "plain"}]
    ds = TokenizedDataset(records, tok, max_seq_len=96)
    assert len(ds) == len(records) and ds.dropped == 0
    assert [ds[i] for i in range(len(ds))] == [encode_record(r, tok, 96) for r in records]
    assert ds.num_target_tokens == sum(len(_targets(encode_record(r, tok, 96))) for r in records)


# ------------------------------------------------------------------------------ loading
GOOD = [
    {"text": "plain text"},
    {"instruction": "Do it.", "input": "x", "output": "y"},
    {"instruction": "Do it.", "output": "y"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
]


def test_load_records_json_list_data_key_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(GOOD))
    (tmp_path / "b.json").write_text(json.dumps({"data": GOOD, "meta": "ignored"}))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in GOOD[:2]) + "\n\n  \n" + "\n".join(json.dumps(r) for r in GOOD[2:]))
    for name in ("a.json", "b.json", "c.jsonl"):
        assert load_records(tmp_path / name) == GOOD
    assert [record_format(r) for r in GOOD] == ["text", "instruction", "instruction", "chat"]
    # Alpaca dumps carry a rendered "text" beside the fields: the fields win.
    assert record_format({"instruction": "a", "output": "b", "text": "c"}) == "instruction"


@pytest.mark.parametrize(
    "name, content, where, what",
    [
        ("bad.jsonl", '{"text": "a"}\n\n{"text": "b"\n', "line 3", "invalid JSON"),
        ("bad.json", '[{"text": "a"},', "line 1", "invalid JSON"),
        ("unknown.json", json.dumps([{"text": "a"}, {"prompt": "a", "completion": "b"}]), "record 2", "unknown record format"),
        ("missing.jsonl", json.dumps({"text": "a"}) + "\n" + json.dumps({"instruction": "a", "input": "b"}), "line 2", "missing \"output\""),
        ("notobj.jsonl", '{"text": "a"}\n["text"]\n', "line 2", "JSON object"),
        ("types.json", json.dumps({"data": [{"instruction": "a", "output": 3}]}), "record 1", "\"output\" must be a string"),
        ("role.json", json.dumps([{"messages": [{"role": "bot", "content": "x"}]}]), "record 1", "role 'bot'"),
        ("noassist.json", json.dumps([{"messages": [{"role": "user", "content": "x"}]}]), "record 1", "no \"assistant\""),
        ("emptytext.jsonl", '{"text": ""}\n', "line 1", "non-empty"),
        ("empty.jsonl", "\n\n", "", "no records"),
        ("empty.json", "[]", "", "no records"),
        ("scalar.json", "3", "", "list of records"),
        ("data.csv", "text\nhello\n", "", "unsupported file type"),
    ],
)
def test_load_records_errors_name_the_file_and_record(tmp_path, name, content, what, where):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert str(path) in message and where in message and what in message, message
    assert isinstance(info.value, ValueError)


def test_load_records_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------ batching
def test_collate_pads_right_and_masks():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
        {"input_ids": [9, 10], "labels": [9, 10]},
    ]
    out = collate(batch, pad_token_id=1)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 3) for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX], [9, 10, IGNORE_INDEX]]
    # L is the longest in this batch, not a fixed length.
    assert collate(batch[1:], pad_token_id=0)["input_ids"].shape == (2, 2)
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)
