"""Constrained decoding with xgrammar: a request's output held to a JSON schema, any JSON object, a
regular expression, a fixed set of strings or an EBNF grammar, whatever the model's weights are.

A `Guide` says what the output must match. The engine compiles it once at submit time through
`Grammars` (xgrammar's compiler, which caches compiled grammars by their source), gives every sample of
the request its own `GrammarMatcher`, and before each sampling step masks, row by row, the tokens that
the row's grammar state forbids (one packed int32 bitmask for the batch, applied in place to the logits
by xgrammar's kernel). Each accepted token advances the row's state; a grammar that is complete ends the
sequence. MTP drafts of a constrained sequence are drawn under the mask and verified against masked
target rows, each row masked with the state after the drafts before it (speculative.py), and the state
is rolled back to the committed tokens before they are accepted. This stays exact: the masked
distribution is what a constrained request samples from, and verification is lossless for any target."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import torch

from hemat.errors import HematError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# JSON-schema keywords xgrammar does not enforce: refused rather than silently ignored
UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                        "contains", "minContains", "maxContains", "uniqueItems", "unevaluatedItems",
                        "unevaluatedProperties", "$dynamicRef", "multipleOf")


class ConstraintError(HematError):
    """A constraint hemat cannot enforce (bad schema, unsupported keyword, bad regex); the message names it."""


@dataclass(frozen=True)
class Guide:
    """What a request's output must match. kind: one of KINDS; spec: the schema (a dict) for
    json_schema, the pattern for regex, the list of strings for choice, EBNF text for grammar, None for
    json_object. `where` names the request field it came from, for error messages."""

    kind: str
    spec: object = None
    where: str = "response_format"

    def source(self) -> str:
        """The guide as xgrammar compiles it (EBNF for choice, JSON text for schemas)."""
        if self.kind == "json_schema":
            return json.dumps(self.spec)
        if self.kind == "choice":
            return "root ::= " + " | ".join(json.dumps(choice) for choice in self.spec)
        return "" if self.spec is None else str(self.spec)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(f"{self.where}: unknown constraint kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.kind == "json_schema":
            check_schema(self.spec, self.where)
        elif self.kind == "choice":
            if not isinstance(self.spec, list) or not self.spec or not all(isinstance(c, str) and c for c in self.spec):
                raise ConstraintError(f"{self.where}: must be a non-empty list of non-empty strings, got {self.spec!r}")
        elif self.kind in ("regex", "grammar") and (not isinstance(self.spec, str) or not self.spec):
            raise ConstraintError(f"{self.where}: must be a non-empty string, got {self.spec!r}")


def check_schema(schema, where: str) -> None:
    """A JSON schema hemat can enforce: a dict (or true), with no keyword xgrammar would ignore."""
    if schema is True:
        return
    if not isinstance(schema, dict):
        raise ConstraintError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    stack = [(schema, where)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                is_name = path.rsplit(".", 1)[-1] in ("properties", "$defs", "definitions")  # a property, not a keyword
                if key in UNSUPPORTED_KEYWORDS and not is_name:
                    raise ConstraintError(f"{path}: the JSON-schema keyword {key!r} is not supported by "
                                          "constrained decoding")
                stack.append((value, f"{path}.{key}"))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))


# xgrammar 0.2.9 writes length-bounded strings (minLength/maxLength) with this class, which lets raw control
# characters through (invalid JSON); every other string rule excludes them
_LOOSE_STRING_CHAR, _JSON_STRING_CHAR = r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]'


def json_schema_ebnf(xgrammar, schema: str) -> str:
    """The schema's grammar as EBNF, compact (no optional whitespace) and valid JSON in every string."""
    text = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
    return text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


class Grammars:
    """xgrammar's compiler for one tokenizer and vocabulary, with counters for the engine's stats."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        try:
            import xgrammar
        except ImportError:  # an extra: xgrammar pulls transformers and triton into the install
            raise ConstraintError("constrained decoding (response_format, guided_*, forced tool calls) needs "
                                  "xgrammar: pip install 'hemat[structured]'") from None

        self.xgr = xgrammar
        # what TokenizerInfo.from_huggingface does, from the tokenizers backend (no transformers needed)
        encoded = [""] * vocab_size
        for token, index in tokenizer.backend.get_vocab(with_added_tokens=True).items():
            if index < vocab_size:
                encoded[index] = token
        meta = xgrammar.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
        info = xgrammar.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size,
                                      stop_token_ids=list(stop_token_ids), add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()  # compiles come from server threads
        self.active = 0  # grammar states alive (one per constrained sequence)
        self.mask_seconds = 0.0
        self.masked_tokens = 0

    def compile(self, guide: Guide):
        """The compiled grammar (cached by xgrammar); ConstraintError naming the field when it cannot compile."""
        guide.validate()
        try:
            with self._lock:
                if guide.kind == "json_object":
                    return self.compiler.compile_builtin_json_grammar()
                if guide.kind == "json_schema":
                    return self.compiler.compile_grammar(json_schema_ebnf(self.xgr, guide.source()))
                if guide.kind == "regex":
                    return self.compiler.compile_regex(guide.spec)
                return self.compiler.compile_grammar(guide.source())
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ConstraintError(f"{guide.where}: cannot compile the {guide.kind.replace('_', ' ')}: {reason}") from None

    def matcher(self, compiled):
        """A fresh grammar state for one sequence."""
        with self._lock:
            self.active += 1
        return self.xgr.GrammarMatcher(compiled)

    def release(self, matcher) -> None:
        with self._lock:
            self.active -= 1

    def mask(self, logits: torch.Tensor, matchers: list) -> torch.Tensor:
        """float32 logits with each row's forbidden tokens at -inf; rows whose matcher is None are untouched."""
        rows = self.row_mask(len(matchers))
        for i, matcher in enumerate(matchers):
            if matcher is not None:
                rows.fill(i, matcher)
        return rows.apply(logits)

    def row_mask(self, num_rows: int) -> RowMask:
        """A batch bitmask to fill row by row (each with its state at that moment) and apply once."""
        return RowMask(self, num_rows)

    def stats(self) -> dict:
        return {"grammar_states": self.active, "grammar_masked_tokens": self.masked_tokens,
                "grammar_mask_seconds": self.mask_seconds}

    @staticmethod
    def idle_stats() -> dict:
        """stats() before any constrained request (no compiler built yet)."""
        return {"grammar_states": 0, "grammar_masked_tokens": 0, "grammar_mask_seconds": 0.0}


class RowMask:
    """One packed bitmask for a batch of logits rows, applied by one xgrammar kernel call."""

    def __init__(self, grammars: Grammars, num_rows: int):
        self.grammars, self.rows = grammars, []
        self.seconds = 0.0
        start = time.perf_counter()
        self.bitmask = grammars.xgr.allocate_token_bitmask(num_rows, grammars.vocab_size)
        self.seconds += time.perf_counter() - start

    def fill(self, row: int, matcher) -> None:
        """Row `row` allows what matcher's current state allows; a terminated state (a draft past the
        end, never emitted) leaves the row unmasked."""
        if matcher.is_terminated():
            return
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(self.bitmask, row)
        self.rows.append(row)
        self.seconds += time.perf_counter() - start

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 [rows, vocab] logits with the filled rows' forbidden tokens at -inf (in place when float32)."""
        start = time.perf_counter()
        logits = logits.float()
        if self.rows:
            self.grammars.xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device),
                                                          vocab_size=self.grammars.vocab_size, indices=self.rows)
        g = self.grammars
        g.mask_seconds += self.seconds + time.perf_counter() - start
        g.masked_tokens += len(self.rows)
        return logits
