"""The data pipeline: the embedded word-problem generator, `data prepare` shards and the token loader."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hemat.data import shards
from hemat.data.loader import TokenLoader
from hemat.data.shards import DataError, document_prefix, prepare_shards
from hemat.data.synthetic import (
    LEVELS,
    TEMPLATES,
    eval_problems,
    extract_answer,
    format_chat,
    format_pretrain_document,
    format_prompt,
    generate_problems,
    problem_split,
    train_problems,
    write_corpus,
)
from hemat.tokenizer import load_tokenizer, train_tokenizer

# ---- synthetic problems -----------------------------------------------------------------------

ARITHMETIC = re.compile(r"[\d(][\d\s+\-*/()]*=\s*(\d+)")


def step_values(step: str) -> list[tuple[str, int]]:
    """Every "expression = value" written in a step, as (expression, value)."""
    return [(m.group(0).split("=")[0], int(m.group(1))) for m in ARITHMETIC.finditer(step)]


def test_generator_is_deterministic():
    a, b = generate_problems(60, seed=3), generate_problems(60, seed=3)
    assert a == b
    assert generate_problems(20, seed=3) == a[:20]  # a prefix of a longer run
    assert [p.question for p in generate_problems(60, seed=4)] != [p.question for p in a]
    assert len({p.question for p in a}) == 60 and len({p.id for p in a}) == 60


def test_train_and_eval_questions_are_disjoint():
    train = train_problems(3000, seed=0)
    evals = eval_problems(200, seed=0)
    assert len(evals) == 200 and len({p.question for p in evals}) == 200
    assert not {p.question for p in train} & {p.question for p in evals}
    assert all(problem_split(p.question) == "eval" for p in evals)
    # a different seed draws other problems, yet its train side still never meets eval questions
    assert not {p.question for p in train_problems(3000, seed=7)} & {p.question for p in evals}
    assert eval_problems(200, seed=0) == evals


def test_answers_follow_from_the_steps_arithmetic():
    problems = generate_problems(600, seed=1)
    assert {p.template for p in problems} == set(TEMPLATES)
    assert {p.difficulty for p in problems} == set(LEVELS)
    for p in problems:
        assert 1 <= len(p.steps) <= 4, p
        assert len(p.question.split()) <= 40, p
        assert isinstance(p.answer, int) and p.answer > 0
        for step in p.steps:
            found = step_values(step)
            assert found, f"step shows no arithmetic: {step!r}"
            for expression, value in found:
                assert eval(expression, {"__builtins__": {}}) == value, (step, p)  # digits and + - * / ( ) only
        assert step_values(p.steps[-1])[-1][1] == p.answer, p


def test_difficulty_sets_the_number_of_steps():
    assert all(len(p.steps) == 1 for p in generate_problems(100, seed=0, difficulty=1))
    assert all(len(p.steps) in (2, 3) for p in generate_problems(100, seed=0, difficulty=2))
    hard = generate_problems(100, seed=0, difficulty=3)
    assert all(len(p.steps) >= 3 for p in hard)
    assert max(p.answer for p in hard) > max(p.answer for p in generate_problems(100, seed=0, difficulty=1))


@pytest.mark.parametrize("text, expected", [
    ("3 * 4 = 12. The answer is 12.", 12),
    ("The answer is 7. Wait, the answer is -3", -3),
    ("the answer is: $1,250.", 1250),
    ("so 5 + 5 = 10\n#### 10", 10),
    ("\\boxed{42}", 42),
    ("I think it's 5 - 3 = 2", 2),
    ("The answer is 2.5", None),
    ("The answer is 8.0", 8),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_formats():
    p = generate_problems(1, seed=0, difficulty=3)[0]
    doc = format_pretrain_document(p)
    assert doc.startswith(format_prompt(p.question))
    assert doc.endswith(f"The answer is {p.answer}.") and all(step in doc for step in p.steps)
    assert extract_answer(doc) == p.answer
    chat = format_chat(p)
    user, assistant = chat["messages"]
    assert user == {"role": "user", "content": p.question}
    assert assistant["role"] == "assistant" and assistant["reasoning_content"].split("\n") == p.steps
    assert extract_answer(assistant["content"]) == p.answer


def test_write_corpus(tmp_path):
    paths = write_corpus(tmp_path / "corpus", 300, seed=0, include_stdlib_code=True, stdlib_max_bytes=60_000)
    assert [p.name for p in paths] == ["arithmetic.jsonl", "python_stdlib.jsonl"]
    records = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert len(records) == 300 and all(problem_split(r["question"]) == "train" for r in records)
    assert records[0]["text"] == format_pretrain_document(train_problems(1)[0])
    code = [json.loads(line) for line in paths[1].read_text().splitlines()]
    assert code and all(r["path"].endswith(".py") for r in code)
    assert 0 < sum(len(r["text"].encode()) for r in code) <= 60_000


# ---- data prepare -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    text = root / "train.txt"
    text.write_text("\n".join(format_pretrain_document(p) for p in train_problems(400, seed=5)) + "\nhéllo wörld\n")
    out = root / "tokenizer"
    train_tokenizer([text], 400, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def big_vocab_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level tokenizer of 70,000 tokens whose byte tokens have ids above 65,535: needs uint32."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    special = ["<|begin_of_text|>", "<|end_of_text|>"]
    tokens = special + [f"unused{i}" for i in range(70_000 - 256 - len(special))]
    tokens += sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special)
    out = tmp_path_factory.mktemp("bigtok")
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": special[0], "eos_token": special[1]}))
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def mixed_inputs(root: Path) -> tuple[list[Path], list[str]]:
    """A .txt, a .jsonl and a .parquet file, and the documents they hold in reading order."""
    docs = [format_pretrain_document(p) for p in train_problems(90, seed=2)]
    root.mkdir(parents=True, exist_ok=True)
    txt = root / "a.txt"
    txt.write_text(docs[0] + "\nsecond line of the same document, héllo\n")
    jsonl = write_jsonl(root / "b.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs[1:50])] + ["", '{"text": " "}'])
    parquet = root / "c.parquet"
    pq.write_table(pa.table({"text": docs[50:], "n": list(range(40))}), parquet, row_group_size=16)
    return [txt, jsonl, parquet], [txt.read_text()] + docs[1:]


def split_documents(tokens: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eos)
    assert len(ends) and ends[-1] == len(tokens) - 1, "every document ends with EOS"
    return [part.tolist() for part in np.split(tokens, ends + 1)[:-1]]


def read_split(out: Path, manifest: dict, split: str) -> np.ndarray:
    files = [s["file"] for s in manifest["shards"] if s["split"] == split]
    return np.concatenate([np.fromfile(out / f, dtype=manifest["dtype"]) for f in files])


def test_prepare_txt_jsonl_parquet(tmp_path, tokenizer_dir):
    inputs, docs = mixed_inputs(tmp_path / "in")
    out = tmp_path / "shards"
    manifest = prepare_shards([str(tmp_path / "in" / "*")], tokenizer_dir, out, val_fraction=0.2,
                              shard_tokens=500, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    tok = load_tokenizer(tokenizer_dir)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == tok.vocab_size
    assert manifest["eos_token_id"] == tok.eos_token_id == 1
    tok_hash = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == tok_hash
    assert [Path(s["path"]).name for s in manifest["sources"]] == ["a.txt", "b.jsonl", "c.parquet"]
    for source, path in zip(manifest["sources"], inputs):
        assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert source["bytes"] == path.stat().st_size
    assert [s["documents"] for s in manifest["sources"]] == [1, 49, 40]  # blank line and blank text skipped
    assert manifest["documents"] == 90

    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert val["documents"] > 0 and train["documents"] > val["documents"]
    assert train["documents"] + val["documents"] == 90
    assert manifest["total_tokens"] == train["tokens"] + val["tokens"] == sum(s["tokens"] for s in manifest["shards"])
    assert all(0 < s["tokens"] <= 500 for s in manifest["shards"]) and train["shards"] > 1
    for shard in manifest["shards"]:
        assert (out / shard["file"]).stat().st_size == 2 * shard["tokens"]

    # every document comes back, whole and in order, in exactly one split; bytes per token add up
    got = {}
    for split in ("train", "val"):
        parts = split_documents(read_split(out, manifest, split), tok.eos_token_id)
        assert len(parts) == manifest["splits"][split]["documents"]
        assert all(p[0] == tok.bos_token_id for p in parts)  # each document starts as a prompt does
        texts = [tok.decode(p[1:-1]) for p in parts]
        got[split] = texts
        byte_count = sum(len(t.encode()) for t in texts)
        stats = manifest["splits"][split]
        assert stats["bytes_per_token"] == pytest.approx(byte_count / stats["tokens"])
    assert sorted(got["train"] + got["val"]) == sorted(docs)
    assert [d for d in docs if d in set(got["train"])] == got["train"]
    assert not list(tmp_path.glob("shards.tmp-*"))

    again = prepare_shards(inputs, tokenizer_dir, tmp_path / "again", val_fraction=0.2, shard_tokens=500,
                           progress=False)
    assert again == manifest  # deterministic, split included
    assert read_split(tmp_path / "again", again, "val").tolist() == read_split(out, manifest, "val").tolist()


def test_txt_split_modes_and_val_tokens(tmp_path, tokenizer_dir, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("one line\ntwo line\n\nthree line\n\n\nfour\n")
    for mode, count in (("file", 1), ("lines", 4), ("blank", 3)):
        m = prepare_shards([text], tokenizer_dir, tmp_path / mode, txt_split=mode, val_fraction=0, progress=False)
        assert m["documents"] == count and m["splits"]["val"]["tokens"] == 0
    # a long .txt document is read in small pieces (cutting lines and UTF-8 characters) yet stays one document
    monkeypatch.setattr(shards, "PIECE_BYTES", 7)
    long = tmp_path / "long.txt"
    long.write_text("".join(f"line {i}: café crème, naïve\n" for i in range(40)))
    m = prepare_shards([long], tokenizer_dir, tmp_path / "long", val_fraction=0, progress=False)
    (document,) = split_documents(read_split(tmp_path / "long", m, "train"), 1)
    assert m["documents"] == 1 and load_tokenizer(tokenizer_dir).decode(document[1:-1]) == long.read_text()
    monkeypatch.undo()
    docs = write_jsonl(tmp_path / "d.jsonl", [{"text": format_pretrain_document(p)} for p in train_problems(200)])
    m = prepare_shards([docs], tokenizer_dir, tmp_path / "vt", val_tokens=300, progress=False)
    assert m["val_tokens"] == 300 and 300 <= m["splits"]["val"]["tokens"] < 300 + 100
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 200


def test_large_vocab_uses_uint32(tmp_path, big_vocab_tokenizer_dir):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"text": "héllo world"}, {"text": "abc"}, {"text": "xyz"}])
    m = prepare_shards([docs], big_vocab_tokenizer_dir, tmp_path / "out", val_fraction=0, progress=False)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70_000
    tokens = read_split(tmp_path / "out", m, "train")
    tok = load_tokenizer(big_vocab_tokenizer_dir)
    assert tokens.max() > 65_535
    start = len(document_prefix(tok))  # this tokenizer adds no BOS
    assert start == 0
    assert [tok.decode(d[start:-1]) for d in split_documents(tokens, 1)] == ["héllo world", "abc", "xyz"]


BAD_INPUTS = {
    "binary.txt": (b"hello\nworld\n\x00\x01\x02", "binary.txt:3"),
    "latin1.txt": (b"ok\ncaf\xe9\n", "latin1.txt:2"),
    "missing.jsonl": (b'{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n', "missing.jsonl:3: no field 'text'"),
    "malformed.jsonl": (b'{"text": "a"}\n{"text": "b"\n', "malformed.jsonl:2: malformed JSON"),
    "number.jsonl": (b'{"text": 5}\n', "number.jsonl:1: field 'text' is int"),
    "notes.csv": (b"a,b\n", "unsupported file type '.csv'"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_names_file_and_line(tmp_path, tokenizer_dir, name):
    content, message = BAD_INPUTS[name]
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine text"}] * 20)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_shards([good, tmp_path / name], tokenizer_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_bad_parquet_and_empty_inputs(tmp_path, tokenizer_dir):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol\.parquet: no column 'text' \(columns: body\)"):
        prepare_shards([tmp_path / "nocol.parquet"], tokenizer_dir, tmp_path / "o1", progress=False)
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet: row 2: 'text' is null"):
        prepare_shards([tmp_path / "null.parquet"], tokenizer_dir, tmp_path / "o2", progress=False)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no text found in .*empty.txt"):
        prepare_shards([tmp_path / "empty.txt"], tokenizer_dir, tmp_path / "o3", progress=False)
    with pytest.raises(DataError, match="no files match"):
        prepare_shards([str(tmp_path / "*.nothing")], tokenizer_dir, tmp_path / "o4", progress=False)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "only one"}])
    with pytest.raises(DataError, match="validation split is empty"):
        prepare_shards([one], tokenizer_dir, tmp_path / "o5", val_fraction=0.01, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_interrupted_prepare_leaves_no_complete_output(tmp_path, tokenizer_dir, monkeypatch):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"text": format_pretrain_document(p)} for p in train_problems(100)])
    out = tmp_path / "out"
    first = prepare_shards([docs], tokenizer_dir, out, val_fraction=0.1, progress=False)
    with pytest.raises(DataError, match="already exists"):
        prepare_shards([docs], tokenizer_dir, out, progress=False)

    calls = []

    def interrupt_after_two_shards(self, ids):  # a ^C in the middle of writing shards
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        original_write(self, ids)

    original_write = shards._SplitWriter.write
    monkeypatch.setattr(shards, "BATCH_DOCS", 8)
    monkeypatch.setattr(shards._SplitWriter, "write", interrupt_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards([docs], tokenizer_dir, tmp_path / "fresh", shard_tokens=64, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards([docs], tokenizer_dir, out, overwrite=True, progress=False)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]  # no tmp or half-written dirs
    assert json.loads((out / "manifest.json").read_text()) == first  # the old output is untouched

    monkeypatch.undo()
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n' * 50 + "{oops\n")
    with pytest.raises(DataError, match="bad.jsonl:51"):
        prepare_shards([docs, tmp_path / "bad.jsonl"], tokenizer_dir, out, overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == first
    small = prepare_shards([docs], tokenizer_dir, out, overwrite=True, val_fraction=0.5, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == small != first


def test_cli_data_prepare(tmp_path, tokenizer_dir, capsys):
    from hemat.cli import main

    main(["data", "synthetic", "--out", str(tmp_path / "corpus"), "--problems", "120"])
    main(["data", "prepare", "--input", str(tmp_path / "corpus" / "*.jsonl"), "--tokenizer", str(tokenizer_dir),
          "--out", str(tmp_path / "shards"), "--val-fraction", "0.1"])
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["documents"] == 120 and manifest["splits"]["val"]["documents"] > 0
    assert "val:" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    with pytest.raises(SystemExit, match=r"hemat data: .*bad.jsonl:1: expected a JSON object"):
        main(["data", "prepare", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tokenizer_dir),
              "--out", str(tmp_path / "x")])


# ---- loader -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("loader")
    docs = write_jsonl(root / "d.jsonl", [{"text": format_pretrain_document(p)} for p in train_problems(80, seed=9)])
    prepare_shards([docs], tokenizer_dir, root / "shards", val_fraction=0.1, shard_tokens=1000, progress=False)
    return root / "shards"


def take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_batches_are_shifted_windows_of_the_stream(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    stream = torch.from_numpy(read_split(data_dir, manifest, "train").astype(np.int64))
    loader = TokenLoader(data_dir, "train", batch_size=4, seq_len=32, seed=1)
    assert loader.num_windows == (len(stream) - 1) // 32
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        start = next(s for s in range(0, len(stream) - 32, 32) if torch.equal(stream[s:s + 32], row_x))
        assert torch.equal(stream[start + 1:start + 33], row_y)
    # one batch as large as the epoch: every window exactly once
    whole = TokenLoader(data_dir, "train", batch_size=loader.num_windows, seq_len=32, seed=1).next_batch()[0]
    expected = stream[: loader.num_windows * 32].view(-1, 32)
    assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, expected.tolist()))
    assert not torch.equal(whole, expected)  # shuffled


def test_loader_determinism_and_resume(data_dir):
    def make(**kw):
        return TokenLoader(data_dir, "train", batch_size=kw.pop("batch_size", 8), seq_len=32, **kw)

    reference = take(make(seed=3), 40)  # runs past the end of the first epoch
    assert make(seed=3).num_windows < 40 * 8
    assert_same(take(make(seed=3), 40), reference)
    assert not torch.equal(take(make(seed=4), 1)[0][0], reference[0][0])

    loader = make(seed=3)
    take(loader, 17)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON round trip, as in a checkpoint
    resumed = make(seed=0)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert_same(take(resumed, 23), reference[17:])


def test_two_ranks_see_the_single_process_global_batch(data_dir):
    single = TokenLoader(data_dir, "train", batch_size=8, seq_len=32, seed=5)
    ranks = [TokenLoader(data_dir, "train", batch_size=4, seq_len=32, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for _ in range(30):  # crosses an epoch boundary
        x, y = single.next_batch()
        parts = [rank.next_batch() for rank in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    # a checkpoint of the 2-rank run resumes on one process with the same global batch
    resumed = TokenLoader(data_dir, "train", batch_size=8, seq_len=32)
    resumed.load_state_dict(ranks[1].state_dict())
    assert_same(take(resumed, 5), take(single, 5))


def test_val_batches(data_dir):
    loader = TokenLoader(data_dir, "train", batch_size=2, seq_len=16)
    first, again = list(loader.val_batches(3)), list(loader.val_batches(3))
    assert len(first) == 3
    assert_same(first, again)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    val = torch.from_numpy(read_split(data_dir, manifest, "val").astype(np.int64))
    assert torch.equal(first[0][0][0], val[:16]) and torch.equal(first[0][1][1], val[17:33])
    ranks = [TokenLoader(data_dir, "train", batch_size=1, seq_len=16, rank=r, world_size=2) for r in (0, 1)]
    for k, (x, _) in enumerate(first):
        assert torch.equal(torch.cat([list(r.val_batches(3))[k][0] for r in ranks]), x)
    windows = (len(val) - 1) // 16
    assert len(list(loader.val_batches(10_000))) == windows // 2  # capped at what the split holds
    assert loader.bytes_per_token("val") == manifest["splits"]["val"]["bytes_per_token"] > 1


def test_loader_errors(tmp_path, data_dir):
    with pytest.raises(DataError, match="no manifest.json"):
        TokenLoader(tmp_path, "train", batch_size=1, seq_len=8)
    with pytest.raises(DataError, match="split 'test' is empty"):
        TokenLoader(data_dir, "test", batch_size=1, seq_len=8)
    with pytest.raises(DataError, match="too few for one sequence"):
        TokenLoader(data_dir, "val", batch_size=1, seq_len=1_000_000)
    with pytest.raises(DataError, match="rank must be"):
        TokenLoader(data_dir, "train", batch_size=1, seq_len=8, rank=2, world_size=2)
    state = TokenLoader(data_dir, "train", batch_size=1, seq_len=8).state_dict()
    with pytest.raises(DataError, match="seq_len=8"):
        TokenLoader(data_dir, "train", batch_size=1, seq_len=16).load_state_dict(state)
