import json

import pytest

from hemat.cli import main
from hemat.errors import HematError
from hemat.tokenizer import (
    CHAT_TEMPLATE,
    check_text_file,
    MIN_VOCAB_SIZE,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "Halo dunia! Saya sedang belajar membuat model bahasa yang murah dan cepat.\n",
    "Berapa hasil dari 123 + 4567? Jawabannya adalah 4690.\n\n",
    "The quick brown fox jumps over the lazy dog; it's 3.14 times faster.\n",
    "def add(a, b):\n    return a + b\n\n\tprint(add(2, 3))\n",
    "你好，世界！我们今天学习数学。\n",
    "Emoji time 🙂🚀 and ✨ sparkles.\n",
    "<think>\nlet me add the numbers\n</think>\nThe answer is 42.\n",
]
TRICKY = [
    "Selamat pagi, apa kabar? Saya baik-baik saja.",
    "机器学习很有趣，但是需要很多数据。",
    "emoji 🙂🚀👨‍👩‍👧‍👦 and flags 🇮🇩",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\r\n",
    "   leading and trailing spaces   ",
    "\n\n\n\t\t  \n",
    "mixed <think>reasoning</think> and <|user|> markers",
    "zero-width\u200bjoiner, accents é è, math ∑∫√, nbsp\u00a0here",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Berapa 2 + 3?"},
    {"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5"},
    {"role": "user", "content": "Dan 10 × 10? 🙂"},
]


def write_corpus(directory, files=2, repeat=20):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = directory / f"part{i}.txt"
        path.write_text("".join(CORPUS[i:] + CORPUS[:i]) * repeat, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    files = write_corpus(root / "data")
    out = root / "tokenizer"
    return train_tokenizer(files, 400, out, show_progress=False), out


def test_special_token_ids_and_vocab(trained):
    tok, _ = trained
    expected = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    assert [tok.id_to_token(i) for i in range(6)] == expected
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.eos_token_ids) == (0, 1, 2, [1])
    assert (tok.think_start_id, tok.think_end_id) == (6, 7)
    assert tok.vocab_size == 400
    assert tok.encode("<think>") == [6] and tok.encode("</think>") == [7]
    assert tok.encode("hi", add_special_tokens=True)[0] == 0
    assert tok.chat_template == CHAT_TEMPLATE


def test_round_trip_and_batch(trained):
    tok, _ = trained
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text, text
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    ids = tok.encode("a<think>b</think><|user|>c")
    assert tok.decode(ids, skip_special_tokens=True) == "a<think>b</think>c"


def test_newline_runs_are_learned(trained):
    tok, _ = trained
    # the corpus has "\n\n" runs; training from whole files (not line by line) must have merged them
    assert len(tok.encode("\n\n")) == 1


def test_save_and_reload(trained, tmp_path):
    tok, out = trained
    reloaded = load_tokenizer(out)
    assert reloaded.encode(TRICKY[3]) == tok.encode(TRICKY[3])
    assert reloaded.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)
    reloaded.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy" / "tokenizer.json").eos_token_ids == [1]


def test_chat_template(trained):
    tok, _ = trained
    text = tok.apply_chat_template(MESSAGES)
    assert text == (
        "<|begin_of_text|><|system|>You are a careful assistant.<|user|>Berapa 2 + 3?"
        "<|assistant|><think>\n2 + 3 = 5\n</think>\n5<|end_of_text|><|user|>Dan 10 × 10? 🙂<|assistant|>"
    )
    assert not tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("<|assistant|>")
    ids = tok.apply_chat_template(MESSAGES, tokenize=True)
    assert ids[0] == 0 and ids[-1] == 5 and 6 in ids and 7 in ids
    with pytest.raises(TokenizerError, match="unknown chat role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_transformers_agrees(trained):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok, out = trained
    hf = AutoTokenizer.from_pretrained(out)
    assert isinstance(hf, PreTrainedTokenizerFast)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for text in TRICKY:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf.encode(text) == tok.encode(text, add_special_tokens=True), text
        assert hf.decode(tok.encode(text)) == text
    for generation_prompt in (True, False):
        assert hf.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=generation_prompt
        ) == tok.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt)
    # transformers' other name for the reasoning field renders the same
    renamed = [dict(m) for m in MESSAGES]
    renamed[2]["reasoning"] = renamed[2].pop("reasoning_content")
    assert tok.apply_chat_template(renamed) == tok.apply_chat_template(MESSAGES)
    hf_text = hf.apply_chat_template(renamed, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(renamed) == hf_text


def test_decode_stream_holds_back_partial_characters(trained):
    tok, _ = trained
    text = "Halo 🙂🚀 你好世界 👨‍👩‍👧 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the rare characters are split into byte tokens
    stream = tok.decode_stream()
    pieces = [stream.step(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text
    assert "".join(pieces) == text  # nothing is left held back once the text is complete


def test_decode_stream_skips_special_tokens(trained):
    tok, _ = trained
    ids = [0, *tok.encode("你好"), 1]
    stream = tok.decode_stream(skip_special_tokens=True)
    assert "".join(stream.step(i) for i in ids) == "你好"


def test_loads_transformers_qwen_style_directory(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 5, trainer)
    qwen_template = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=qwen_template
    )
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    # special tokens may also be AddedToken dicts
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, Tokenizer)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == [2, 0]
    assert tok.bos_token_id is None and tok.pad_token_id == 0
    assert tok.think_start_id is None and tok.think_end_id is None
    assert tok.vocab_size == hf.vocab_size
    messages = [{"role": "user", "content": "Halo 🙂"}]
    hf = AutoTokenizer.from_pretrained(tmp_path)
    rendered = tok.apply_chat_template(messages)
    assert rendered == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHalo 🙂<|im_end|>\n<|im_start|>assistant\n"
    for text in TRICKY:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == text


def test_cli_trains_from_a_glob(tmp_path, capsys):
    write_corpus(tmp_path / "data", files=3, repeat=5)
    out = tmp_path / "tok"
    pattern = str(tmp_path / "data" / "*.txt")
    main(["tokenizer", "train", "--input", pattern, "--vocab-size", "300", "--out", str(out)])
    assert (out / "tokenizer.json").is_file()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"] == CHAT_TEMPLATE
    assert "3 file(s)" in capsys.readouterr().out
    assert load_tokenizer(out).vocab_size == 300


def test_bad_inputs(tmp_path):
    good = write_corpus(tmp_path / "data", files=1, repeat=2)[0]
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"text\nmore\x00\x01\x02")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\nline two\ncaf\u00e9\n".encode("latin-1"))
    cases = [
        (tmp_path / "missing.txt", r"missing\.txt does not exist"),
        (empty, r"empty\.txt is empty"),
        (binary, r"blob\.bin looks binary: NUL byte at line 2"),
        (latin1, r"latin1\.txt is not UTF-8 text: undecodable byte at line 3"),
        (tmp_path / "data", r"data is not a file"),
    ]
    for path, message in cases:
        with pytest.raises(TokenizerError, match=message):
            train_tokenizer([good, path], 300, tmp_path / "out", show_progress=False)
    with pytest.raises(HematError, match=f"vocab size 200 is too small.*at least {MIN_VOCAB_SIZE}"):
        train_tokenizer([good], 200, tmp_path / "out", show_progress=False)
    with pytest.raises(TokenizerError, match=r"output .*blob\.bin exists and is not a directory"):
        train_tokenizer([good], 300, binary, show_progress=False)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"hemat tokenizer: --input '.*\*\.nothing' matches no files"):
        main(["tokenizer", "train", "--input", str(tmp_path / "*.nothing"), "--vocab-size", "300", "--out", "x"])
    with pytest.raises(SystemExit, match="blob.bin looks binary"):
        main(["tokenizer", "train", "--input", str(binary), "--vocab-size", "300", "--out", str(tmp_path / "o")])


def test_text_check_across_chunk_boundaries(tmp_path):
    # multi-byte characters cut by the read chunks are fine; a bad byte after a cut is located exactly
    path = tmp_path / "cut.txt"
    path.write_bytes("aé\n你好🙂\n".encode() + b"x\xff")
    with pytest.raises(TokenizerError, match=r"at line 3 \(byte offset 16\)"):
        check_text_file(path, chunk_bytes=2)
    path.write_bytes(b"a\nb\xe4x")  # a character cut at the chunk's end, then not continued
    with pytest.raises(TokenizerError, match=r"at line 2 \(byte offset 3\)"):
        check_text_file(path, chunk_bytes=4)
    path.write_text("aé\n你好🙂\n")
    check_text_file(path, chunk_bytes=2)
