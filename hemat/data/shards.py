"""`hemat data prepare`: text, JSONL and Parquet files → tokenised, memory-mappable `.bin` shards.

Documents are streamed in bounded batches (never a whole large file at once), tokenised, each followed
by EOS, and appended to uint16 (vocab ≤ 65536) or uint32 shards of the train or val split; a
document's split is chosen by a hash of its index, so it is deterministic. `manifest.json` records
dtype, vocabulary, tokenizer hash, shards, sources (size, sha256) and bytes per token (for bits per
byte). Output is written into `OUT.tmp-XXXX`, the manifest last, and renamed to OUT only when
complete, so an interrupted run never leaves a complete-looking directory."""

from __future__ import annotations

import argparse
import codecs
import glob
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from hemat.errors import HematError
from hemat.model.hub import resolve_model_source

SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_SPLITS = ("file", "lines", "blank")
MANIFEST = "manifest.json"
FORMAT = "hemat-token-shards"
BATCH_DOCS = 512  # documents tokenised together (encode_batch parallelises over them)
BATCH_BYTES = 8 << 20  # ... or this many bytes of text, whichever comes first
PIECE_BYTES = 1 << 20  # a long .txt document is read and tokenised in line-aligned pieces of this size
VAL_TOKENS_RATE = 0.1  # with --val-tokens, one document in ten goes to val until it is full


class DataError(HematError):
    """Bad input data or a bad shard directory; the message names the file and line or field."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir}: no {MANIFEST}; create the shards with `hemat data prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a hemat shard manifest (format is not {FORMAT!r})")
    return manifest


# ---- inputs -----------------------------------------------------------------------------------

def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Paths, globs and directories → the list of input files, in a stable order, each once."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        matches = sorted(glob.glob(text, recursive=True)) if glob.has_magic(text) else [text]
        if not matches:
            raise DataError(f"{text}: no files match this pattern")
        for match in map(Path, matches):
            if match.is_dir():
                found = sorted(p for p in match.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
                if not found:
                    raise DataError(f"{match}: directory holds no {', '.join(SUFFIXES)} files")
                files += found
            elif not match.exists():
                raise DataError(f"{match}: no such file")
            elif match.suffix not in SUFFIXES:
                raise DataError(f"{match}: unsupported file type {match.suffix!r}; hemat reads {', '.join(SUFFIXES)}")
            else:
                files.append(match)
    return list(dict.fromkeys(files))


def _check_not_binary(path: Path, f: BinaryIO) -> None:
    head = f.read(8192)
    f.seek(0)
    if b"\0" in head:
        line = head[: head.index(b"\0")].count(b"\n") + 1
        raise DataError(f"{path}:{line}: NUL byte: this is a binary file, not text")


def _text_lines(path: Path) -> Iterator[tuple[str, bool]]:
    """(text, line complete?) with lines cut at PIECE_BYTES so memory stays bounded."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lineno = 1
    with path.open("rb") as f:
        _check_not_binary(path, f)
        while chunk := f.readline(PIECE_BYTES):
            if b"\0" in chunk:
                raise DataError(f"{path}:{lineno}: NUL byte: this is a binary file, not text")
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from None
            complete = chunk.endswith(b"\n")
            yield text, complete
            lineno += complete
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}:{lineno}: not UTF-8 text (truncated character at the end)") from None


def _read_txt(path: Path, split: str) -> Iterator[tuple[str, bool]]:
    """(text, ends a document?) pieces: the whole file is one document (`file`), or each line is
    (`lines`), or each blank-line-separated block is (`blank`)."""
    parts: list[str] = []
    size = 0
    started = False  # a `file` document already sent out in pieces
    for text, complete in _text_lines(path):
        if split == "file":
            parts.append(text)
            size += len(text)
            if size >= PIECE_BYTES:
                yield "".join(parts), False
                parts, size, started = [], 0, True
        elif split == "lines":
            parts.append(text)
            if complete:
                line = "".join(parts).rstrip("\r\n")
                parts = []
                if line.strip():
                    yield line, True
        elif text.strip() or not complete:
            parts.append(text)
        elif parts:
            yield "".join(parts).rstrip("\r\n"), True
            parts = []
    rest = "".join(parts)
    if split == "file":
        if started or rest.strip():
            yield rest, True
    elif rest.strip():
        yield rest.rstrip("\r\n"), True


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    with path.open("rb") as f:
        _check_not_binary(path, f)
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if b"\0" in raw:
                raise DataError(f"{where}: NUL byte: this is a binary file, not JSON lines")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, "
                                f"got {type(record).__name__}")
            if text_field not in record:
                raise DataError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, record)) or 'none'})")
            value = record[text_field]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
            if value.strip():
                yield value, True


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'hemat[data]')") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {text_field!r} has type {column_type}, expected strings")
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):  # one batch in memory at a time
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                raise DataError(f"{path}: row {row}: {text_field!r} is null")
            if value.strip():
                yield value, True


def read_documents(path: Path, text_field: str = "text", txt_split: str = "file") -> Iterator[tuple[str, bool]]:
    """(text, ends a document?) for one input file; a document may come in several pieces. Blank documents
    are skipped."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field)
    return _read_txt(path, txt_split)


# ---- output -----------------------------------------------------------------------------------

@dataclass
class _SplitWriter:
    """Appends tokens of one split to shards of at most shard_tokens tokens."""
    out_dir: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    _file: BinaryIO | None = None

    def write(self, ids: np.ndarray) -> None:
        self.tokens += len(ids)
        while len(ids):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self._file = (self.out_dir / name).open("wb")
                self.shards.append({"file": name, "split": self.split, "tokens": 0})
            shard = self.shards[-1]
            part = ids[: self.shard_tokens - shard["tokens"]]
            part.tofile(self._file)
            shard["tokens"] += len(part)
            ids = ids[len(part):]
            if shard["tokens"] == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes,
                "bytes_per_token": self.bytes / self.tokens if self.tokens else None,
                "shards": len(self.shards)}


def _unit_hash(index: int) -> float:
    """A document index → a uniform-looking number in [0, 1), the same on every machine."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def document_prefix(tokenizer) -> list[int]:
    """What the tokenizer's own post-processor puts before a text (BOS for hemat's and Llama's, nothing
    for Qwen2's): every document starts with it, as prompts do at inference."""
    return tokenizer.encode("", add_special_tokens=True)


class _Tokenise:
    """Batches pieces of documents, tokenises them together and routes each document to a split."""

    def __init__(self, tokenizer, writers: dict[str, _SplitWriter], val_fraction: float, val_tokens: int | None,
                 bar: tqdm) -> None:
        self.tokenizer, self.writers, self.bar = tokenizer, writers, bar
        self.val_fraction, self.val_tokens = val_fraction, val_tokens
        self.eos = np.array([tokenizer.eos_token_id])
        self.bos = np.array(document_prefix(tokenizer), dtype=np.int64)
        self.max_id = np.iinfo(writers["train"].dtype).max
        self.pending: list[tuple[str, bool]] = []
        self.pending_bytes = 0
        self.documents = 0  # documents started so far: the index that picks a document's split
        self.doc_split = "train"
        self.doc_open = False

    def add(self, text: str, ends_doc: bool) -> int:
        """Queue a piece; returns 1 when it ends a document."""
        self.pending.append((text, ends_doc))
        self.pending_bytes += len(text)
        if len(self.pending) >= BATCH_DOCS or self.pending_bytes >= BATCH_BYTES:
            self.flush()
        return int(ends_doc)

    def _pick_split(self) -> str:
        index, self.documents = self.documents, self.documents + 1
        if self.val_tokens is not None:
            full = self.writers["val"].tokens >= self.val_tokens
            return "val" if not full and _unit_hash(index) < VAL_TOKENS_RATE else "train"
        return "val" if _unit_hash(index) < self.val_fraction else "train"

    def flush(self) -> None:
        if not self.pending:
            return
        encoded = self.tokenizer.encode_batch([text for text, _ in self.pending])
        for (text, ends_doc), ids in zip(self.pending, encoded):
            array = np.asarray(ids, dtype=np.int64)
            if not self.doc_open:
                self.doc_split, self.doc_open = self._pick_split(), True
                array = np.concatenate([self.bos, array])
            writer = self.writers[self.doc_split]
            if ends_doc:
                array = np.concatenate([array, self.eos])
                writer.documents += 1
                self.doc_open = False
            if len(array) and (array.min() < 0 or array.max() > self.max_id):
                raise DataError(f"tokenizer produced id {array.max()} outside {writer.dtype} (vocab_size is wrong?)")
            writer.write(array.astype(writer.dtype))
            writer.bytes += len(text.encode("utf-8"))
            self.bar.update(len(array))
        self.pending, self.pending_bytes = [], 0


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; pass --overwrite to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished directory into place; an existing OUT is replaced only after tmp is complete."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    out.rename(old / out.name)
    tmp.rename(out)
    shutil.rmtree(old)


def prepare_shards(inputs: Iterable[str | Path], tokenizer_dir: str | Path, out_dir: str | Path, *,
                   text_field: str = "text", val_fraction: float = 0.01, val_tokens: int | None = None,
                   shard_tokens: int = 100_000_000, txt_split: str = "file", overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Tokenise input files into train/val shards under out_dir and return the manifest."""
    from hemat.tokenizer import load_tokenizer

    if txt_split not in TXT_SPLITS:
        raise DataError(f"txt_split must be one of {', '.join(TXT_SPLITS)}, got {txt_split!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_tokens is not None and val_tokens <= 0:
        raise DataError(f"val_tokens must be positive, got {val_tokens}")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    files = expand_inputs(inputs)
    tokenizer_dir = resolve_model_source(tokenizer_dir)  # a Hub id: its cached snapshot
    tokenizer_file = tokenizer_dir
    if tokenizer_file.is_dir():
        tokenizer_file = tokenizer_file / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DataError(f"{tokenizer_file} does not exist; train a tokenizer with `hemat tokenizer train`")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise DataError(f"{tokenizer_dir}: the tokenizer has no eos_token (tokenizer_config.json); documents need one")
    dtype = token_dtype(tokenizer.vocab_size)
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published shards should be readable like any directory
    writers = {split: _SplitWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")}
    try:
        with tqdm(unit="tok", unit_scale=True, desc="tokenising", disable=not progress) as bar:
            batcher = _Tokenise(tokenizer, writers, val_fraction, val_tokens, bar)
            sources = []
            for path in files:
                bar.set_postfix_str(path.name)
                documents = sum(batcher.add(text, ends) for text, ends in read_documents(path, text_field, txt_split))
                sources.append({"path": str(path.resolve()), "bytes": path.stat().st_size,
                                "sha256": file_sha256(path), "documents": documents})
            batcher.flush()
        for writer in writers.values():
            writer.close()
        train, val = writers["train"], writers["val"]
        if train.tokens == 0:
            raise DataError(f"no text found in {', '.join(map(str, files))} (or every document went to val)")
        if (val_fraction > 0 or val_tokens) and val.tokens == 0:
            raise DataError(f"the validation split is empty: {batcher.documents} documents and val_fraction "
                            f"{val_fraction} selected none; raise --val-fraction or add data")
        manifest = {
            "format": FORMAT,
            "version": 1,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "tokenizer": {"path": str(Path(tokenizer_dir).resolve()), "sha256": file_sha256(tokenizer_file)},
            "text_field": text_field,
            "txt_split": txt_split,
            "val_fraction": None if val_tokens is not None else val_fraction,
            "val_tokens": val_tokens,
            "total_tokens": train.tokens + val.tokens,
            "documents": batcher.documents,
            "splits": {split: writer.summary() for split, writer in writers.items()},
            "shards": train.shards + val.shards,
            "sources": sources,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(tmp, out)
    except BaseException:  # KeyboardInterrupt too: leave nothing that looks like finished shards
        for writer in writers.values():
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---- CLI --------------------------------------------------------------------------------------

def _prepare_command(args: argparse.Namespace) -> None:
    manifest = prepare_shards(
        args.input, args.tokenizer, args.out, text_field=args.text_field,
        val_fraction=args.val_fraction if args.val_fraction is not None else 0.01, val_tokens=args.val_tokens,
        shard_tokens=args.shard_tokens, txt_split=args.txt_split, overwrite=args.overwrite,
    )
    for split, stats in manifest["splits"].items():
        print(f"{split}: {stats['tokens']:,} tokens, {stats['documents']:,} documents, {stats['shards']} shards, "
              f"{stats['bytes_per_token'] or 0:.2f} bytes/token")
    print(f"wrote {args.out} ({manifest['dtype']})")


def _synthetic_command(args: argparse.Namespace) -> None:
    from hemat.data.synthetic import write_corpus

    for path in write_corpus(args.out, args.problems, args.seed, args.stdlib_code, args.stdlib_bytes):
        print(f"wrote {path}")


def add_command(subparsers) -> set[str]:
    data = subparsers.add_parser("data", help="tokenise text into training shards; write the embedded corpus",
                                 description="Prepare token shards for pretraining, or write the embedded "
                                             "arithmetic word-problem corpus.")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = actions.add_parser(
        "prepare", help="tokenise .txt/.jsonl/.parquet files into memory-mapped shards",
        description="Tokenise text (.txt), JSON lines (.jsonl) and Parquet (.parquet) files, each document "
                    "opened as the tokenizer opens a text (BOS) and closed by EOS, into uint16/uint32 .bin shards with a manifest.json and a held-out "
                    "validation split chosen by a hash of each document's index.")
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    prep.add_argument("--tokenizer", required=True, metavar="DIR",
                      help="tokenizer directory (or its tokenizer.json), or a Hub id org/name[@revision]")
    prep.add_argument("--out", required=True, metavar="DIR", help="output directory for shards and manifest")
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    val = prep.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=None, help="share of documents held out (default 0.01)")
    val.add_argument("--val-tokens", type=int, default=None, help="hold out documents until val has this many tokens")
    prep.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    prep.add_argument("--txt-split", choices=TXT_SPLITS, default="file",
                      help="a .txt file is one document (file), one per line (lines) or per blank-line block (blank)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    prep.set_defaults(func=_prepare_command)
    synth = actions.add_parser(
        "synthetic", help="write the embedded arithmetic word-problem corpus as JSONL",
        description="Write training-side arithmetic word problems with worked solutions (never the held-out "
                    "eval problems), and optionally Python standard library source, as JSONL for `data prepare`.")
    synth.add_argument("--out", required=True, metavar="DIR")
    synth.add_argument("--problems", type=int, default=20_000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--stdlib-code", action="store_true", help="also write python_stdlib.jsonl")
    synth.add_argument("--stdlib-bytes", type=int, default=2_000_000, help="bytes of stdlib source to include")
    synth.set_defaults(func=_synthetic_command)
    return {"data"}
