"""`hemat sft`: supervised fine-tuning on chat JSONL, on the shared training loop.

Data: one conversation per line, {"messages": [{"role": "system" | "user" | "assistant", "content": ...,
"reasoning_content": ... (assistant, optional)}, ...]} (what `hemat distill` writes), or, without a file,
hemat's embedded arithmetic problems as chats whose reasoning is the worked solution.

Each conversation is rendered with the checkpoint's own chat template and tokenised turn by turn:
every assistant turn (its `<think>` reasoning, its answer and its end-of-turn token) is trained on;
system and user turns and the generation prompt are context only. Conversations are packed first-fit
into rows of seq_len tokens. Inside a row each conversation keeps its own positions (0, 1, ...) and
attends only to itself (a block-diagonal causal mask), so packing changes the speed and nothing else.

    hemat sft --model runs/pretrain/checkpoints/step-500 --run-dir runs/sft
    hemat sft --model DIR --data traces.jsonl --run-dir runs/sft --steps 300 --set sft.lr=1e-4
    hemat sft --run-dir runs/sft --resume"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from hemat.data.jsonl import read_jsonl
from hemat.errors import HematError
from hemat.train.config import ConfigValueError, LoraSection, RunConfig, StageSection, load_config
from hemat.train.stage import DEFAULT_CONFIG, FineTune, add_fine_tune_arguments, fine_tune_flags, resolve_config

ROLES = ("system", "user", "assistant")


class SFTDataError(HematError):
    """A chat file hemat cannot train on; the message names the file, line and field."""


@dataclass
class SFTConfig(StageSection):
    """The sft: section. Its train: keys override train: for SFT: seq_len is the tokens per packed row, and
    mtp_weight > 0 keeps the MTP layers (speculative drafts) in step with the main model."""

    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        steps=300, seq_len=512, batch_tokens=8192, micro_batch_size=8, lr=1e-3, warmup_steps=20, schedule="cosine",
        min_lr_ratio=0.1, weight_decay=0.0, mtp_weight=0.3, eval_interval=100, checkpoint_interval=0,
        keep_checkpoints=2, seed=0)
    problems: int = 20000  # embedded: training-side problems (never held-out ones)
    difficulty: int | None = None  # embedded: 1-3, null mixes them
    val_examples: int = 200  # conversations held out for the validation loss (0: none)
    packing: bool = True  # false: one conversation per row, padded

    def validate(self) -> None:
        if self.problems <= 0:
            raise ConfigValueError(f"sft.problems must be positive, got {self.problems}")
        if self.val_examples < 0:
            raise ConfigValueError(f"sft.val_examples must not be negative, got {self.val_examples}")
        if self.difficulty not in (None, 1, 2, 3):
            raise ConfigValueError(f"sft.difficulty must be 1, 2, 3 or null, got {self.difficulty}")


SCHEMAS = {"sft": SFTConfig, "lora": LoraSection}


# ---- data: conversations → token ids and the loss mask --------------------------------------------------
def read_chats(path: str | Path) -> list[list[dict]]:
    """The conversations of a chat JSONL file, checked line by line."""
    return [check_messages(record, f"{path}:{lineno}")
            for lineno, record in read_jsonl(path, SFTDataError, "chat file", "conversations")]


def check_messages(record, where: str) -> list[dict]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: expected an object with a non-empty 'messages' list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise SFTDataError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise SFTDataError(f"{where}: messages[{i}].content must be a string")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise SFTDataError(f"{where}: messages[{i}].reasoning_content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise SFTDataError(f"{where}: no assistant message to train on")
    return messages


def embedded_chats(n: int, seed: int = 0, difficulty: int | None = None) -> list[list[dict]]:
    from hemat.data.synthetic import format_chat, train_problems

    return [format_chat(p)["messages"] for p in train_problems(n, seed, difficulty)]


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and a mask with 1 on the assistant turns' tokens. Each
    generation prompt is tokenised as the engine tokenises it at inference, and each reply after it."""
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise SFTDataError("the chat template does not render an assistant turn as a continuation of its "
                               "generation prompt, so the reply's tokens cannot be told apart")
        context, reply = tokenizer.encode(prompt[len(done):]), tokenizer.encode(full[len(prompt):])
        ids += context + reply
        mask += [0] * len(context) + [1] * len(reply)
        done = full
    return ids, mask


@dataclass
class PackedRows:
    """Rows of packed conversations, [rows, seq_len] each: input ids, next-token targets, loss mask (1 on
    assistant targets), positions (restarting at 0 in every conversation) and the conversation index
    within the row (padding is a conversation of its own, so no attention row is ever empty)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    documents: torch.Tensor
    truncated: int = 0  # conversations cut to fit seq_len

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, rows) -> tuple[torch.Tensor, ...]:
        return tuple(t[rows].long() for t in (self.inputs, self.targets, self.mask, self.positions, self.documents))


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, packing: bool = True, pad_id: int = 0,
         window: int = 16) -> PackedRows:
    """Shift each conversation into (inputs, targets) of its own, cut it to seq_len, and place it in the
    first of the last `window` open rows with room (or one row each without packing)."""
    rows: list[list[tuple[list[int], list[int], list[int]]]] = []
    free: list[int] = []
    open_rows: list[int] = []
    truncated = 0
    for ids, mask in examples:
        inputs, targets, tmask = ids[:-1], ids[1:], mask[1:]
        if len(inputs) > seq_len:
            inputs, targets, tmask = inputs[:seq_len], targets[:seq_len], tmask[:seq_len]
            truncated += 1
        if not any(tmask):
            continue
        slot = next((r for r in open_rows if free[r] >= len(inputs)), None) if packing else None
        if slot is None:
            slot = len(rows)
            rows.append([])
            free.append(seq_len)
            open_rows = (open_rows + [slot])[-window:]
        rows[slot].append((inputs, targets, tmask))
        free[slot] -= len(inputs)
    if not rows:
        raise SFTDataError("no conversation has an assistant token to train on")
    shape = (len(rows), seq_len)
    out = {name: torch.zeros(shape, dtype=torch.int32) for name in ("inputs", "targets", "mask", "positions", "documents")}
    out["inputs"].fill_(pad_id)
    out["targets"].fill_(pad_id)
    for r, docs in enumerate(rows):
        at = 0
        for d, (inputs, targets, tmask) in enumerate(docs):
            n = len(inputs)
            out["inputs"][r, at: at + n] = torch.tensor(inputs)
            out["targets"][r, at: at + n] = torch.tensor(targets)
            out["mask"][r, at: at + n] = torch.tensor(tmask)
            out["positions"][r, at: at + n] = torch.arange(n)
            out["documents"][r, at: at + n] = d
            at += n
        out["positions"][r, at:] = torch.arange(seq_len - at)
        out["documents"][r, at:] = len(docs)
    return PackedRows(**out, truncated=truncated)


class RowLoader:
    """The trainer's batch source: micro-batches of rows in a seeded order, reshuffled every epoch,
    with a state to resume from."""

    def __init__(self, rows: PackedRows, micro_batch_size: int, seed: int = 0):
        self.rows, self.micro_batch_size, self.seed = rows, micro_batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"hemat-sft:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        picked = []
        while len(picked) < self.micro_batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            take = self._order[self.index: self.index + self.micro_batch_size - len(picked)]
            picked += take
            self.index += len(take)
        return self.rows.batch(torch.tensor(picked))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.rows):
            raise HematError(f"cannot resume: the data packs into {len(self.rows)} rows, the checkpoint's into "
                             f"{state.get('rows')} (did sft.data, seq_len or the tokenizer change?)")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffled(self.epoch)

    def batches(self):
        """Every row once, in order (validation)."""
        for start in range(0, len(self.rows), self.micro_batch_size):
            yield self.rows.batch(torch.arange(start, min(start + self.micro_batch_size, len(self.rows))))


# ---- the loss ---------------------------------------------------------------------------------------------
class DocumentMask:
    """Stands in for a KV cache in a training forward: every layer attends to its own keys under a
    block-diagonal causal mask [batch, seq, seq], so packed conversations never see each other."""

    def __init__(self, documents: torch.Tensor):
        seq = documents.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
        self.mask = (documents[:, :, None] == documents[:, None, :]) & causal

    def attend(self, layer_idx: int, attention, q: torch.Tensor, new: tuple[torch.Tensor, ...], scale: float):
        t = q.shape[1]  # an MTP depth's queries are the first t positions
        return attention(q, *new, self.mask[:, :t, :t], scale)


def sft_loss(model, batch, mtp_weight: float = 0.0, chunk: int = 2048) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the assistant targets of packed rows (+ λ · the MTP loss, whose depth-k targets
    count only inside the same conversation, + the MoE balance losses while training)."""
    from hemat.train.loop import IGNORE_INDEX, add_balance_loss, mtp_loss, token_cross_entropy

    inputs, targets, mask, positions, documents = batch
    document_mask = DocumentMask(documents)
    hidden = model.model(inputs, positions, document_mask)
    targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
    loss = token_cross_entropy(hidden, model.output_weight(), targets, chunk)
    parts = {"lm_loss": loss.detach()}
    if model.training and mtp_weight > 0 and model.mtp_layers:
        mtp = mtp_loss(model, hidden, inputs, targets, chunk, positions, document_mask, documents)
        loss = loss + mtp_weight * mtp
        parts["mtp_loss"] = mtp.detach()
    return add_balance_loss(model, loss, parts)


# ---- the stage --------------------------------------------------------------------------------------------
def load_sft_config(source: str | Path = DEFAULT_CONFIG, overrides: list[str] = ()) -> RunConfig:
    return load_config(source, overrides, schemas=SCHEMAS)


def run_sft(config: RunConfig, run_dir: str | Path, *, model_dir: str | Path | None = None,
            resume: str | None = None) -> dict:
    """Fine-tune config.sections["sft"].model (or model_dir) on sft.data (or the embedded chats) into
    RUN/checkpoints/step-N/ (with the tokenizer); returns the last step's metrics plus `checkpoint`."""
    with FineTune("sft", config, run_dir, model_dir, resume) as stage:
        cfg, train, tokenizer = stage.cfg, stage.train, stage.tokenizer
        model = stage.load_model()
        if train.seq_len > model.config.max_position_embeddings:
            raise ConfigValueError(f"sft.seq_len ({train.seq_len}) exceeds the model's context "
                                   f"({model.config.max_position_embeddings})")
        chats = read_chats(cfg.data) if cfg.data else embedded_chats(cfg.problems, train.seed, cfg.difficulty)
        random.Random(f"hemat-sft-split:{train.seed}").shuffle(chats)
        n_val = min(cfg.val_examples, len(chats) // 10)
        examples = [encode_chat(tokenizer, m) for m in chats]
        pad = tokenizer.pad_token_id or 0
        rows = pack(examples[n_val:], train.seq_len, cfg.packing, pad)
        val_rows = pack(examples[:n_val], train.seq_len, cfg.packing, pad) if n_val else None
        cut = f"; {rows.truncated} cut to seq_len" if rows.truncated else ""
        print(f"sft: {len(chats) - n_val} conversations ({n_val} held out) in {len(rows)} rows of {train.seq_len}; "
              f"{int(rows.mask.sum()):,} assistant tokens{cut}", flush=True)
        return stage.fit(model, RowLoader(rows, train.micro_batch_size, train.seed),
                         val_batches=RowLoader(val_rows, train.micro_batch_size).batches if n_val else None,
                         loss_fn=lambda m, b: sft_loss(m, b, train.mtp_weight, train.loss_chunk_tokens))


# ---- CLI --------------------------------------------------------------------------------------------------
def _sft_command(args: argparse.Namespace) -> None:
    run_sft(resolve_config(args, fine_tune_flags("sft"), SCHEMAS), args.run, resume=args.resume)


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning on chat JSONL (loss on assistant tokens, reasoning included)",
        description="Fine-tune a checkpoint on conversations: {\"messages\": [{\"role\", \"content\", "
                    "\"reasoning_content\"}]} per line (e.g. from `hemat distill`), or hemat's embedded arithmetic "
                    "problems as chats when no --data is given. The loss covers the assistant turns only. Writes "
                    "RUN/config.yaml, metrics.jsonl, ledger.json (the starting checkpoint's stages included), "
                    "loss.png and checkpoints/step-N/ with the tokenizer; --resume continues a run.")
    add_fine_tune_arguments(p, "sft", "chat JSONL with a 'messages' list per line (sft.data; default: the embedded "
                                  "arithmetic problems)")
    p.set_defaults(func=_sft_command)
    return {"sft"}
