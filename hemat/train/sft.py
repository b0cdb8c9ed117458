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
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from hemat.data.jsonl import read_jsonl
from hemat.errors import HematError
from hemat.train.config import ConfigValueError, LoraSection, RunConfig, TrainConfig, load_config

DEFAULT_CONFIG = "cpu-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
ROLES = ("system", "user", "assistant")


class SFTDataError(HematError):
    """A chat file hemat cannot train on; the message names the file, line and field."""


@dataclass
class SFTConfig:
    model: str | None = None  # checkpoint directory to start from; it holds the tokenizer
    data: str | None = None  # chat JSONL; null: the embedded arithmetic problems as chats
    problems: int = 20000  # embedded: training-side problems (never held-out ones)
    difficulty: int | None = None  # embedded: 1-3, null mixes them
    val_examples: int = 200  # conversations held out for the validation loss (0: none)
    steps: int = 300
    seq_len: int = 512  # tokens per packed row
    batch_tokens: int = 8192  # tokens per optimizer step (rows × seq_len)
    micro_batch_size: int = 8  # rows per forward/backward
    packing: bool = True  # false: one conversation per row, padded
    lr: float = 1e-3
    warmup_steps: int = 20
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    mtp_weight: float = 0.3  # keeps the MTP layers (speculative drafts) in step with the main model
    eval_interval: int = 100  # steps between validation losses (0: only at the end)
    checkpoint_interval: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    seed: int = 0

    def validate(self) -> None:
        for key in ("steps", "seq_len", "batch_tokens", "micro_batch_size", "problems", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise ConfigValueError(f"sft.{key} must be positive, got {getattr(self, key)}")
        for key in ("val_examples", "warmup_steps", "eval_interval", "checkpoint_interval", "weight_decay",
                    "mtp_weight"):
            if getattr(self, key) < 0:
                raise ConfigValueError(f"sft.{key} must not be negative, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigValueError(f"sft.lr must be positive, got {self.lr}")
        if self.difficulty not in (None, 1, 2, 3):
            raise ConfigValueError(f"sft.difficulty must be 1, 2, 3 or null, got {self.difficulty}")


def stage_train_config(train: TrainConfig, **changes) -> TrainConfig:
    """The pretraining section (device, dtype, optimizer, prices) with a stage's own values on top."""
    out = dataclasses.replace(train, **changes)
    out.validate()
    return out


def tokenizer_files(model_dir: str | Path) -> list[Path]:
    """The tokenizer files of a checkpoint, to ship inside every checkpoint of the next stage."""
    return [Path(model_dir) / name for name in TOKENIZER_FILES if (Path(model_dir) / name).is_file()]


def inherit_ledger(model_dir: str | Path, run_dir: str | Path) -> None:
    """Start this run's ledger with the stages that produced the starting checkpoint (its own ledger.json,
    or its run's, for RUN/checkpoints/step-N), so the totals cover the whole pipeline."""
    from hemat import cost

    model_dir = Path(model_dir).resolve()
    candidates = [model_dir / cost.Ledger.FILENAME]
    if model_dir.parent.name == "checkpoints":
        candidates.append(model_dir.parent.parent / cost.Ledger.FILENAME)
    source = next((c for c in candidates if c.is_file()), None)
    if source is None:
        return
    ledger = cost.Ledger.load_or_new(run_dir)
    ledger.inherit(cost.Ledger.load(source))
    ledger.save()


def starting_checkpoint(path: str | Path | None, stage: str) -> Path:
    """The directory of the checkpoint a stage starts from: a local one, or a Hub id's cached snapshot."""
    from hemat.model.hub import resolve_model_source

    if not path or not resolve_model_source(path).is_dir():
        raise HematError(f"{stage}: give the checkpoint to start from (--model DIR|ORG/NAME or {stage}.model); "
                         f"got {path!r}")
    return resolve_model_source(path)


def apply_lora(model, config: RunConfig, model_dir: str | Path) -> None:
    """The `lora:` section's adapters on the frozen `model` (nothing when lora.rank is 0)."""
    from hemat.model.lora import add_adapters

    section = config.sections.get("lora")
    adapter = section.adapter_config() if section else None
    if adapter is None:
        return
    base = ""
    if section.quantize:
        from hemat.model.qlora import quantize_base

        quantize_base(model, section.quantize, section.group_size)
        group = f" (group {section.group_size})" if section.quantize == "int4" else ""
        base = f" over an {section.quantize} base{group}"
    names = add_adapters(model, adapter, base_model=str(Path(model_dir).resolve()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"lora: rank {adapter.rank} on {len(names)} modules{base}, {trainable:,} trainable parameters "
          f"({100 * trainable / total:.2f}% of {total:,} unquantized)", flush=True)


def base_dtype(config: RunConfig) -> torch.dtype:
    """The dtype the starting checkpoint is read in: float32, or bfloat16 under QLoRA (lora.quantize), whose base
    is then quantized layer by layer, so loading never holds the model in float32."""
    section = config.sections.get("lora")
    return torch.bfloat16 if section and section.rank and section.quantize else torch.float32


def stage_name(base: str, run_dir: str | Path, resume: str | None) -> str:
    """The ledger name of this run's stage: `base`, or `base-2`, ... when the stages inherited from the
    starting checkpoint already hold one (SFT on an SFT model); a resumed run keeps its checkpoint's."""
    from hemat import cost
    from hemat.train import checkpoint

    if resume:
        state = checkpoint.resolve_resume(run_dir, resume) / checkpoint.STATE_DIR / "state.json"
        return json.loads(state.read_text()).get("stage", base)
    taken = {s.stage for s in cost.Ledger.load_or_new(run_dir).stages}
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    return name


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
    """Stands in for a KV cache in a training forward: every layer gets its own keys back with a
    block-diagonal causal mask [batch, seq, seq], so packed conversations never see each other."""

    def __init__(self, documents: torch.Tensor):
        seq = documents.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
        self.mask = (documents[:, :, None] == documents[:, None, :]) & causal

    def update(self, layer_idx: int, *new: torch.Tensor):
        t = new[0].shape[1]  # an MTP depth's queries are the first t positions
        return (*new, self.mask[:, :t, :t])


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
    return load_config(source, overrides, schemas={"sft": SFTConfig, "lora": LoraSection})


def run_sft(config: RunConfig, run_dir: str | Path, *, model_dir: str | Path | None = None,
            resume: str | None = None) -> dict:
    """Fine-tune config.sections["sft"].model (or model_dir) on sft.data (or the embedded chats) into
    RUN/checkpoints/step-N/ (with the tokenizer); returns the last step's metrics plus `checkpoint`."""
    from hemat.model.hf import from_pretrained
    from hemat.tokenizer import load_tokenizer
    from hemat.train import parallel
    from hemat.train.loop import Trainer, prepare_process

    cfg: SFTConfig = config.sections["sft"]
    model_dir = starting_checkpoint(model_dir or cfg.model, "sft")
    cfg.model = config.raw["sft"]["model"] = str(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if not tokenizer.chat_template:
        raise HematError(f"{model_dir}: the tokenizer has no chat template, which SFT renders conversations with")
    train = stage_train_config(
        config.train, steps=cfg.steps, seq_len=cfg.seq_len, batch_tokens=cfg.batch_tokens,
        micro_batch_size=cfg.micro_batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
        min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay, mtp_weight=cfg.mtp_weight,
        eval_interval=cfg.eval_interval, checkpoint_interval=cfg.checkpoint_interval,
        keep_checkpoints=cfg.keep_checkpoints, seed=cfg.seed)
    env = prepare_process(train)
    if env.world_size > 1:
        raise HematError("sft runs in one process; launch it without torchrun")
    try:
        model = from_pretrained(model_dir, dtype=base_dtype(config))
        if cfg.seq_len > model.config.max_position_embeddings:
            raise ConfigValueError(f"sft.seq_len ({cfg.seq_len}) exceeds the model's context "
                                   f"({model.config.max_position_embeddings})")
        chats = read_chats(cfg.data) if cfg.data else embedded_chats(cfg.problems, cfg.seed, cfg.difficulty)
        random.Random(f"hemat-sft-split:{cfg.seed}").shuffle(chats)
        n_val = min(cfg.val_examples, len(chats) // 10)
        examples = [encode_chat(tokenizer, m) for m in chats]
        pad = tokenizer.pad_token_id or 0
        train_rows = pack(examples[n_val:], cfg.seq_len, cfg.packing, pad)
        loader = RowLoader(train_rows, cfg.micro_batch_size, cfg.seed)
        val_batches = None
        if n_val:
            val_loader = RowLoader(pack(examples[:n_val], cfg.seq_len, cfg.packing, pad), cfg.micro_batch_size)
            val_batches = val_loader.batches
        if env.is_main:
            tokens = int(train_rows.mask.sum())
            print(f"sft: {len(chats) - n_val} conversations ({n_val} held out) in {len(train_rows)} rows of "
                  f"{cfg.seq_len}; {tokens:,} assistant tokens"
                  + (f"; {train_rows.truncated} cut to seq_len" if train_rows.truncated else ""), flush=True)
        config.raw["model"] = model.config.to_hf_dict()
        apply_lora(model, config, model_dir)
        if not resume:
            inherit_ledger(model_dir, run_dir)
        trainer = Trainer(model, train, run_dir, loader, val_batches=val_batches, env=env,
                          stage=stage_name("sft", run_dir, resume),
                          loss_fn=lambda m, b: sft_loss(m, b, train.mtp_weight, train.loss_chunk_tokens),
                          extra_files=tokenizer_files(model_dir), run_config=config.to_yaml())
        result = trainer.fit(resume)
        if env.is_main:
            val = f", val loss {result['val_loss']:.4f}" if result.get("val_loss") is not None else ""
            print(f"sft step {trainer.step}: loss {result.get('loss', float('nan')):.4f}{val}\n"
                  f"{trainer.ledger.format()}\ncheckpoint: {result.get('checkpoint')}", flush=True)
        return result
    finally:
        parallel.teardown()


# ---- CLI --------------------------------------------------------------------------------------------------
def resolve_stage_config(args: argparse.Namespace, section: str, schemas: dict) -> RunConfig:
    """--config (or, when resuming, the run's own config.yaml) + --set overrides + the plain flags."""
    source = args.config
    if source is None:
        saved = Path(args.run) / "config.yaml"
        source = saved if args.resume and saved.is_file() else DEFAULT_CONFIG
    overrides = list(args.overrides)
    for flag in ("model", "data", "steps"):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{section}.{flag}={getattr(args, flag)}")
    if args.lora is not None:
        overrides.append(f"lora.rank={args.lora}")
    return load_config(source, overrides, schemas=schemas)


def add_stage_arguments(p: argparse.ArgumentParser, section: str, data_help: str) -> None:
    p.add_argument("--model", metavar="DIR", help=f"checkpoint to start from, with its tokenizer: a directory or a "
                                                  f"Hub id org/name[@revision] ({section}.model)")
    p.add_argument("--data", metavar="FILE", help=data_help)
    p.add_argument("--config", default=None, help=f"preset name or YAML run config (default {DEFAULT_CONFIG}; "
                                                   "with --resume, the run's own config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override a config value, e.g. --set {section}.lr=1e-4 (repeatable)")
    p.add_argument("--run-dir", dest="run", default=f"runs/{section}", metavar="DIR",
                   help=f"run directory (default runs/{section})")
    p.add_argument("--steps", type=int, help=f"optimizer steps ({section}.steps)")
    p.add_argument("--lora", type=int, nargs="?", const=16, metavar="RANK",
                   help="train LoRA adapters of rank RANK (default 16) on the frozen model instead of every weight "
                        "(lora.rank; more settings: --set lora.alpha=32, lora.targets=q_proj,v_proj, ...; QLoRA over "
                        "an int4 base: --set lora.quantize=int4)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the run's newest checkpoint, or from CHECKPOINT (a step-N directory)")


def _sft_command(args: argparse.Namespace) -> None:
    config = resolve_stage_config(args, "sft", {"sft": SFTConfig, "lora": LoraSection})
    run_sft(config, args.run, resume=args.resume)


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning on chat JSONL (loss on assistant tokens, reasoning included)",
        description="Fine-tune a checkpoint on conversations: {\"messages\": [{\"role\", \"content\", "
                    "\"reasoning_content\"}]} per line (e.g. from `hemat distill`), or hemat's embedded arithmetic "
                    "problems as chats when no --data is given. The loss covers the assistant turns only. Writes "
                    "RUN/config.yaml, metrics.jsonl, ledger.json (the starting checkpoint's stages included), "
                    "loss.png and checkpoints/step-N/ with the tokenizer; --resume continues a run.")
    add_stage_arguments(p, "sft", "chat JSONL with a 'messages' list per line (sft.data; default: the embedded "
                                  "arithmetic problems)")
    p.set_defaults(func=_sft_command)
    return {"sft"}
