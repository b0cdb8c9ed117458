"""Tokenizer: byte-level BPE trained with Hugging Face `tokenizers`, saved as `tokenizer.json` +
`tokenizer_config.json` so that transformers (`AutoTokenizer`) loads the directory as is. The same
`Tokenizer` class also wraps any other HF fast-tokenizer directory (Qwen2, Llama, ...)."""

from __future__ import annotations

import argparse
import codecs
import functools
import glob
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from hemat.errors import HematError

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK_START, THINK_END = "<think>", "</think>"
# ids 0..5 in this order, so that model configs can rely on bos=0, eos=1, pad=2
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT]
# ids 6, 7: always one token each, but not special, so decode(skip_special_tokens=True) keeps the reasoning markers
THINK_TOKENS = [THINK_START, THINK_END]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS)

# Llama 3's split: digits in runs of at most 3 and newline runs kept apart help arithmetic and code
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>You may call these functions. For each call, answer with <tool_call>"
    "{\"name\": function name, \"arguments\": JSON object}</tool_call>.\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ (tool['function'] if tool['function'] is defined else tool) | tojson }}"
    "{% endfor %}{{ '\\n</tools>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' }}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}{{ message['content'] }}"
    "{% elif message['role'] == 'tool' %}{{ '<|user|><tool_response>' }}{{ message['content'] }}{{ '</tool_response>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% if message['reasoning_content'] %}{{ '<think>\\n' }}{{ message['reasoning_content'] }}{{ '\\n</think>\\n' }}"
    "{% endif %}{{ message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}{{ '<tool_call>' }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}{{ '</tool_call>' }}"
    "{% endfor %}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' ~ message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names transformers aliases to each other


class TokenizerError(HematError):
    """Bad tokenizer input: the message names the file or value at fault."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what `tokenizer_config.json` adds: special tokens and chat template."""

    def __init__(self, backend: BackendTokenizer, config: dict | None = None, fallback_ids: dict | None = None):
        # a tokenizer.json may carry padding/truncation settings; hemat's callers want the plain ids
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.config = dict(config or {})
        fallback_ids = fallback_ids or {}
        self.chat_template: str | None = self.config.get("chat_template")
        self.special_tokens = {
            name: content
            for name in TEMPLATE_TOKEN_NAMES
            if (content := _token_content(self.config.get(name))) is not None
        }
        self.bos_token_id: int | None = _first(self._special_id("bos_token"), fallback_ids.get("bos_token_id"))
        eos_ids = [self._special_id("eos_token"), *_as_list(fallback_ids.get("eos_token_id"))]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in eos_ids if i is not None))
        self.eos_token_id: int | None = self.eos_token_ids[0] if self.eos_token_ids else None
        self.pad_token_id: int | None = _first(
            self._special_id("pad_token"), fallback_ids.get("pad_token_id"), self.eos_token_id
        )

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return self.backend.token_to_id(token) if token is not None else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def think_start_id(self) -> int | None:
        return self.backend.token_to_id(THINK_START)

    @property
    def think_end_id(self) -> int | None:
        return self.backend.token_to_id(THINK_END)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> DecodeStream:
        return DecodeStream(self, skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False, **kwargs: Any
    ) -> str | list[int]:
        """Render `messages` as transformers' `apply_chat_template` does; extra kwargs reach the template."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        try:
            text = _compile_template(self.chat_template).render(
                messages=[_normalize_message(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **{"tools": None, "documents": None, **self.special_tokens, **kwargs},
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None
        return self.encode(text) if tokenize else text

    def save(self, out_dir: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (the loaded config, updated) into out_dir."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out_dir / "tokenizer.json"))
        config = dict(self.config)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class DecodeStream:
    """Incremental detokenizer for streaming: `step(id)` returns only newly completed text. Text is decoded
    over a short window of ids so that a character split over several byte tokens is held back until whole."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window: context so that decoders see token boundaries right
        self.read_offset = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete UTF-8 sequence at the end
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), U+FFFD included."""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted) :]


# ---- chat template rendering, as transformers does it ------------------------------------------------


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' masks; here it just renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which would change prompts
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat_template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _normalize_message(message: dict) -> dict:
    """Drop None values and alias the reasoning fields, as transformers 5 does before rendering."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


# ---- loading ---------------------------------------------------------------------------------------


def load_tokenizer(source: str | Path) -> Tokenizer:
    """A directory with `tokenizer.json` (hemat's or any HF fast tokenizer), the tokenizer.json itself, a
    .gguf file (its byte-level BPE vocabulary, read by hemat.model.gguf_io) or a Hub id `org/name[@revision]`."""
    if str(source).lower().endswith(".gguf"):
        from hemat.model.gguf_io import load_gguf_tokenizer

        return load_gguf_tokenizer(source)
    from hemat.model.hub import resolve_model_source

    path = resolve_model_source(source)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{file} does not exist (hemat reads Hugging Face tokenizer.json directories)")
    try:
        backend = BackendTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception on a malformed file
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from None
    directory = file.parent
    config = _read_json(directory / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # older format: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        config["chat_template"] = named.get("default") or next(iter(named.values()), None)
    elif template is None and (directory / "chat_template.jinja").is_file():
        config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    # model configs name the ids when tokenizer_config.json does not (e.g. Qwen2 has no bos_token there)
    generation, model = _read_json(directory / "generation_config.json"), _read_json(directory / "config.json")
    fallback_ids = {key: _first(generation.get(key), model.get(key)) for key in ("bos_token_id", "pad_token_id")}
    fallback_ids["eos_token_id"] = _as_list(generation.get("eos_token_id")) + _as_list(model.get("eos_token_id"))
    return Tokenizer(backend, config, fallback_ids)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object at the top level")
    return data


def _token_content(token: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts with a "content" key."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


# ---- training ----------------------------------------------------------------------------------------


def train_tokenizer(
    files: list[str | Path], vocab_size: int, out_dir: str | Path, show_progress: bool = True
) -> Tokenizer:
    """Train byte-level BPE on UTF-8 text files and save it to out_dir. vocab_size counts every token,
    special and think tokens included (a small corpus may stop short of it)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab size {vocab_size} is too small: the 256 byte tokens and {MIN_VOCAB_SIZE - 256} "
            f"special tokens need at least {MIN_VOCAB_SIZE}"
        )
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise TokenizerError(f"output {out_dir} exists and is not a directory")
    paths = [Path(f) for f in files]
    if not paths:
        raise TokenizerError("no input files given")
    for path in paths:
        check_text_file(path)  # all of them before training starts, not an error an hour in

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # encode(add_special_tokens=True) prepends bos, as Llama 3's tokenizer does
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, 0)]
            ),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + THINK_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    # train_from_iterator, not train(files): the latter drops newlines, so "\n\n" would never merge
    backend.train_from_iterator(_read_chunks(paths), trainer=trainer)
    # the trainer marks every token it is given as special; the think markers must stay in decoded text
    data = json.loads(backend.to_str())
    for token in data["added_tokens"]:
        if token["content"] in THINK_TOKENS:
            token["special"] = False
    backend = BackendTokenizer.from_str(json.dumps(data))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    tokenizer = Tokenizer(backend, config)
    tokenizer.save(out_dir)
    return tokenizer


def check_text_file(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Raise TokenizerError unless path is a non-empty UTF-8 text file."""
    if not path.exists():
        raise TokenizerError(f"input file {path} does not exist")
    if not path.is_file():
        raise TokenizerError(f"input {path} is not a file (pass files or a glob such as '{path}/*.txt')")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, has_text = 0, 1, False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            held = len(decoder.getstate()[0])  # bytes of a character cut at the previous chunk's end
            nul = chunk.find(b"\0")
            if nul >= 0:
                line += chunk.count(b"\n", 0, nul)
                raise TokenizerError(f"{path} looks binary: NUL byte at line {line} (byte offset {offset + nul})")
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                line += chunk.count(b"\n", 0, max(e.start - held, 0))
                raise TokenizerError(
                    f"{path} is not UTF-8 text: undecodable byte at line {line} (byte offset {offset - held + e.start})"
                ) from None
            if not chunk:
                break
            has_text = has_text or bool(text.strip())
            offset += len(chunk)
            line += chunk.count(b"\n")
    if not has_text:
        raise TokenizerError(f"input file {path} is empty")


def _read_chunks(paths: list[Path], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Files as ~1M-character pieces cut at line ends, newlines kept."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines: list[str] = []
            size = 0
            for text_line in f:
                lines.append(text_line)
                size += len(text_line)
                if size >= chunk_chars:
                    yield "".join(lines)
                    lines, size = [], 0
            if lines:
                yield "".join(lines)


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Paths and globs (`data/**/*.txt`) → files, in order, without duplicates."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise TokenizerError(f"--input {pattern!r} matches no files")
            paths.extend(matches)
        else:
            paths.append(Path(pattern))
    return list(dict.fromkeys(paths))


# ---- CLI -------------------------------------------------------------------------------------------


def add_command(subparsers) -> set[str]:
    parser = subparsers.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer",
        description="Tokenizer tools. `hemat tokenizer train` learns byte-level BPE from text files.",
    )
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train",
        help="train byte-level BPE on UTF-8 text files",
        description="Train byte-level BPE and write tokenizer.json + tokenizer_config.json (special tokens, "
        "chat template) to --out; transformers' AutoTokenizer loads the directory as is.",
    )
    train.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files or globs ('data/*.txt')"
    )
    train.add_argument(
        "--vocab-size", type=int, required=True, help=f"total vocabulary size (at least {MIN_VOCAB_SIZE})"
    )
    train.add_argument("--out", required=True, metavar="DIR", help="output directory")
    train.set_defaults(func=_train_command)
    return {"tokenizer"}


def _train_command(args: argparse.Namespace) -> None:
    files = expand_inputs(args.input)
    tokenizer = train_tokenizer(files, args.vocab_size, args.out)
    print(f"trained a {tokenizer.vocab_size}-token tokenizer on {len(files)} file(s); wrote {Path(args.out)}")
