"""Log-likelihood evals: multiple choice (ARC, MMLU and HellaSwag JSONL shapes) scored by the
log-probability of each answer, and bits per byte of a text. The same scoring serves the
lm-evaluation-harness adapter.

Every scored text starts as a pretraining document does: with what the tokenizer puts before a text
(BOS for hemat's and Llama's tokenizers), or after EOS, the document separator, for a tokenizer that
adds nothing (Qwen2's), so the first token is predicted too; a text that already begins with BOS (a
chat template's) keeps just that. Choices are
scored as continuations ("Question: ...\\nAnswer:" + " choice"), the cloze form, for all three shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hemat.data.jsonl import read_jsonl
from hemat.data.shards import document_prefix
from hemat.errors import HematError

LOGITS_CHUNK = 4096  # positions per lm-head call: [chunk, vocab] floats instead of [batch, seq, vocab]


class ChoiceDataError(HematError):
    """A multiple-choice file hemat cannot read; the message names the file and line."""


# ---- scoring -------------------------------------------------------------------------------------------


def document_start_id(tokenizer) -> int:
    prefix = document_prefix(tokenizer)
    token = prefix[-1] if prefix else tokenizer.eos_token_id
    if token is None:
        raise HematError("the tokenizer has neither a bos_token nor an eos_token to start a scored text with")
    return token


def with_document_start(tokenizer, ids: list[int]) -> list[int]:
    """ids after the document-start token, unless they already begin with BOS (a chat template's)."""
    if ids and ids[0] == tokenizer.bos_token_id:
        return list(ids)
    return [document_start_id(tokenizer)] + list(ids)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: spaces at the end of the
    context move to the continuation, and the continuation's ids are what encoding the whole text adds
    after the context's, so word boundaries tokenize as they do in running text."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return with_document_start(tokenizer, []), tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return with_document_start(tokenizer, context_ids), whole[len(context_ids) :]


@torch.no_grad()
def score_sequences(model, rows: list[tuple[list[int], int]], batch_size: int = 16) -> list[tuple[float, bool]]:
    """For each (ids, n): the summed log-probability of the last n ids given the ids before them, and
    whether each of those n is the model's argmax (greedy). Rows are batched longest first and
    right-padded, which a causal model never sees from earlier positions."""
    results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    device = model.device
    for begin in range(0, len(order), batch_size):
        batch = order[begin : begin + batch_size]
        width = len(rows[batch[0]][0]) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        positions, targets = [], []
        for b, i in enumerate(batch):
            ids, n = rows[i]
            if not 1 <= n < len(ids):
                raise HematError(f"cannot score the last {n} of {len(ids)} tokens: need 1 <= n < len(ids)")
            inputs[b, : len(ids) - 1] = torch.tensor(ids[:-1])
            positions += [(b, p) for p in range(len(ids) - 1 - n, len(ids) - 1)]
            targets += ids[-n:]
        hidden = model.model(inputs.to(device))
        rows_index = torch.tensor([b for b, _ in positions], device=device)
        cols_index = torch.tensor([p for _, p in positions], device=device)
        picked = hidden[rows_index, cols_index]
        target = torch.tensor(targets, device=device)
        logprobs, greedy = [], []
        for start in range(0, len(targets), LOGITS_CHUNK):
            logits = model.logits(picked[start : start + LOGITS_CHUNK]).float()
            chunk_target = target[start : start + LOGITS_CHUNK]
            logprobs.append(F.log_softmax(logits, dim=-1).gather(-1, chunk_target[:, None]).squeeze(-1))
            greedy.append(logits.argmax(dim=-1) == chunk_target)
        logprobs_all, greedy_all = torch.cat(logprobs).cpu(), torch.cat(greedy).cpu()
        offset = 0
        for i in batch:
            n = rows[i][1]
            results[i] = (float(logprobs_all[offset : offset + n].sum()), bool(greedy_all[offset : offset + n].all()))
            offset += n
    return results


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], max_length: int,
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(log P(continuation | context), continuation is greedy) for each (context, continuation); a
    context too long for the model keeps its last tokens."""
    rows = []
    for context, continuation in pairs:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise HematError(f"empty continuation to score after context {context[-60:]!r}")
        if len(continuation_ids) > max_length:
            raise HematError(f"a continuation of {len(continuation_ids)} tokens does not fit the context "
                             f"of {max_length} tokens")
        ids = (context_ids + continuation_ids)[-(max_length + 1) :]
        rows.append((ids, len(continuation_ids)))
    return score_sequences(model, rows, batch_size)


def rolling_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, n_scored) over a sequence of n_tokens ids whose first is the document start:
    ids[start:end] is fed, and its last n_scored ids are predicted. Every id after the first is
    predicted exactly once, with at least max_length - stride ids of context once the text is longer
    than the window (the last window always has a full one)."""
    if not 1 <= stride <= max_length:
        raise HematError(f"stride must be between 1 and the context length {max_length}, got {stride}")
    windows, done = [], 1  # ids before `done` are predicted already (the first one never is)
    while done < n_tokens:
        end = min(done + stride, n_tokens)
        start = max(0, end - 1 - max_length)
        windows.append((start, end, end - done))
        done = end
    return windows


def rolling_loglikelihood(model, tokenizer, text: str, max_length: int, stride: int | None = None,
                          batch_size: int = 16) -> tuple[float, int]:
    """(summed log-probability of every token of text, number of tokens), with a sliding window for a
    text longer than the context. stride defaults to half the context."""
    ids = with_document_start(tokenizer, tokenizer.encode(text))
    windows = rolling_windows(len(ids), max_length, stride or max(1, max_length // 2))
    scored = score_sequences(model, [(ids[s:e], n) for s, e, n in windows], batch_size)
    return sum(logprob for logprob, _ in scored), len(ids) - 1


def bits_per_byte(model, tokenizer, text: str, max_length: int, stride: int | None = None,
                  batch_size: int = 16) -> dict:
    """Bits per UTF-8 byte: summed token NLL in nats / (ln 2 * bytes). Unlike perplexity it does not
    depend on the tokenizer, so models with different vocabularies compare."""
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0:
        raise HematError("bits per byte of an empty text")
    logprob, n_tokens = rolling_loglikelihood(model, tokenizer, text, max_length, stride, batch_size)
    nll = -logprob
    return {"bpb": nll / (math.log(2) * n_bytes), "nll_nats": nll, "tokens": n_tokens, "bytes": n_bytes,
            "token_nll": nll / n_tokens}


# ---- multiple choice -----------------------------------------------------------------------------------


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]  # continuations as scored, leading space included
    gold: int
    shape: str  # "arc", "mmlu" or "hellaswag"


def load_choice_file(path: str | Path, limit: int | None = None) -> list[ChoiceItem]:
    """A JSONL file of multiple-choice questions, one per line, in any of these shapes:
      ARC        {"question", "choices": {"text": [...], "label": [...]}, "answerKey"}
      MMLU       {"question", "choices": [...], "answer": index or letter}
      HellaSwag  {"ctx", "endings": [...], "label"}"""
    items: list[ChoiceItem] = []
    for lineno, record in read_jsonl(path, ChoiceDataError, "multiple-choice file", "questions", limit):
        try:
            items.append(parse_choice_record(record))
        except ChoiceDataError as e:
            raise ChoiceDataError(f"{path}:{lineno}: {e}") from None
    return items


def parse_choice_record(record) -> ChoiceItem:
    if not isinstance(record, dict):
        raise ChoiceDataError(f"expected a JSON object, got {type(record).__name__}")
    if "ctx" in record and "endings" in record:
        endings = _string_list(record["endings"], "endings")
        gold = _index(record.get("label"), len(endings), "label")
        return ChoiceItem(_string(record["ctx"], "ctx").strip(), [" " + e.strip() for e in endings], gold, "hellaswag")
    if "question" not in record or "choices" not in record:
        raise ChoiceDataError("not an ARC, MMLU or HellaSwag record: needs question + choices, or ctx + endings")
    context = f"Question: {_string(record['question'], 'question').strip()}\nAnswer:"
    choices = record["choices"]
    if isinstance(choices, dict):
        texts = _string_list(choices.get("text"), "choices.text")
        labels = [str(label) for label in _string_list(choices.get("label"), "choices.label", strings=False)]
        if len(labels) != len(texts):
            raise ChoiceDataError(f"choices.text has {len(texts)} entries but choices.label has {len(labels)}")
        key = record.get("answerKey")
        if str(key) not in labels:
            raise ChoiceDataError(f"answerKey {key!r} is not one of the labels {labels}")
        return ChoiceItem(context, [" " + t.strip() for t in texts], labels.index(str(key)), "arc")
    texts = _string_list(choices, "choices")
    return ChoiceItem(context, [" " + t.strip() for t in texts], _index(record.get("answer"), len(texts), "answer"),
                      "mmlu")


def _string(value, field: str) -> str:
    if not isinstance(value, str):
        raise ChoiceDataError(f"field {field} must be a string, got {value!r}")
    return value


def _string_list(value, field: str, strings: bool = True) -> list:
    if not isinstance(value, list) or len(value) < 2:
        raise ChoiceDataError(f"field {field} must be a list of at least 2 choices, got {value!r}")
    if strings:
        for v in value:
            _string(v, field)
    return value


def _index(value, n: int, field: str) -> int:
    """An answer index: an int or a digit string ("2"), or a letter ("C")."""
    if isinstance(value, str) and len(value) == 1 and value.isalpha():
        value = ord(value.upper()) - ord("A")
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ChoiceDataError(f"field {field} must be an index below {n} (or a letter), got {value!r}")
    return value


def evaluate_choice(model, tokenizer, items: list[ChoiceItem], max_length: int,
                    batch_size: int = 16) -> tuple[dict, list[dict]]:
    """acc (highest log-likelihood) and acc_norm (highest log-likelihood per character of the choice,
    lm-evaluation-harness's normalisation, which does not favour short answers), with per-question records."""
    pairs = [(item.context, choice) for item in items for choice in item.choices]
    scores = iter(loglikelihoods(model, tokenizer, pairs, max_length, batch_size))
    records, correct, correct_norm = [], 0, 0
    for item in items:
        logprobs = [next(scores)[0] for _ in item.choices]
        normalised = [lp / max(1, len(choice)) for lp, choice in zip(logprobs, item.choices)]
        pick, pick_norm = _argmax(logprobs), _argmax(normalised)
        correct += pick == item.gold
        correct_norm += pick_norm == item.gold
        records.append({"prompt": item.context, "choices": item.choices, "logprobs": logprobs, "gold": item.gold,
                        "output": item.choices[pick], "extracted": pick, "extracted_norm": pick_norm,
                        "correct": pick == item.gold, "correct_norm": pick_norm == item.gold})
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items)}, records


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise HematError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HematError(f"{path} is not UTF-8 text (undecodable byte at offset {e.start})") from None
    if not text:
        raise HematError(f"text file {path} is empty")
    return text
