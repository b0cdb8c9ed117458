"""`hemat pretrain`: a run config (model + train + data sections) and token shards → a trained model
in RUN/checkpoints/step-N/, with metrics.jsonl, ledger.json and loss.png beside them.

    hemat pretrain --config cpu-tiny --data data/shards --run-dir runs/tiny --set train.steps=200
    hemat pretrain --run-dir runs/tiny --resume                  # continue from the newest checkpoint
    hemat pretrain --config gpu-reference --data ... --nproc 8   # torchrun, DDP (or train.parallel=fsdp)"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hemat.errors import HematError
from hemat.train.config import RunConfig, load_config

DEFAULT_CONFIG = "cpu-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """--config (or, when resuming, the run's own config.yaml) + --set overrides + plain flags."""
    source = args.config
    if source is None:
        saved = Path(args.run) / "config.yaml"
        source = saved if args.resume and saved.is_file() else DEFAULT_CONFIG
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    return load_config(source, overrides)


def tokenizer_files(manifest: dict) -> list[Path]:
    """The tokenizer files the shards were made with, to ship inside every checkpoint."""
    path = Path(manifest.get("tokenizer", {}).get("path") or "")
    folder = path.parent if path.is_file() else path
    return [folder / name for name in TOKENIZER_FILES if str(path) and (folder / name).is_file()]


def pretrain(config: RunConfig, run_dir: str | Path, resume: str | None = None) -> dict:
    import torch  # imported here so that `hemat --help` stays fast

    from hemat.data.loader import TokenLoader
    from hemat.model.transformer import CausalLM
    from hemat.train import parallel
    from hemat.train.loop import Trainer, prepare_process

    train, data = config.train, config.data
    if not data.path:
        raise HematError("no training data: set data.path in the config or pass --data DIR "
                         "(make shards with `hemat data prepare`)")
    env = prepare_process(train)
    try:
        loader = TokenLoader(data.path, data.train_split, train.micro_batch_size, train.seq_len,
                             env.rank, env.world_size, train.seed)
        vocab = loader.manifest.get("vocab_size", 0)
        if vocab > config.model.vocab_size:
            raise HematError(f"{data.path}: the shards use a vocabulary of {vocab} tokens but model.vocab_size is "
                             f"{config.model.vocab_size}")
        val_batches, bytes_per_token = None, None
        stats = loader.manifest["splits"].get(data.val_split) if data.val_split else None
        if stats and (stats["tokens"] - 1) // train.seq_len >= train.micro_batch_size * env.world_size:
            val_batches = lambda: loader.val_batches(train.eval_batches(env.world_size), split=data.val_split)  # noqa: E731
            bytes_per_token = stats.get("bytes_per_token")
        elif data.val_split and env.is_main:
            print(f"note: no validation: split {data.val_split!r} of {data.path} is missing or smaller than one batch")
        with torch.device(env.device):
            model = CausalLM(config.model)
        trainer = Trainer(model, train, run_dir, loader, val_batches=val_batches, bytes_per_token=bytes_per_token,
                          stage="pretrain", env=env, extra_files=tokenizer_files(loader.manifest),
                          run_config=config.to_yaml())
        result = trainer.fit(resume)
        if env.is_main:
            print(_summary(result, trainer), flush=True)
        return result
    finally:
        parallel.teardown()


def _summary(result: dict, trainer) -> str:
    lines = []
    if result.get("stopped_by"):
        lines.append(f"stopped by {result['stopped_by']} at step {trainer.step}")
    loss = f"loss {result['loss']:.4f}" if result.get("loss") is not None else "loss n/a"
    if result.get("val_loss") is not None:
        loss += f", val loss {result['val_loss']:.4f}"
    if result.get("val_bpb") is not None:
        loss += f", {result['val_bpb']:.3f} bits/byte"
    lines.append(f"step {trainer.step}: {loss}")
    lines.append(trainer.ledger.format())
    if result.get("checkpoint"):
        lines.append(f"checkpoint: {result['checkpoint']}")
    return "\n".join(lines)


def run_pretrain(args: argparse.Namespace) -> int | None:
    if args.nproc and "LOCAL_RANK" not in os.environ:
        from hemat.train.parallel import launch

        launch(args.nproc, _argv_without_nproc(args))
    config = resolve_config(args)
    pretrain(config, args.run, args.resume)
    return None


def _argv_without_nproc(args: argparse.Namespace) -> list[str]:
    argv = ["pretrain", "--run-dir", str(args.run)]
    if args.config:
        argv += ["--config", str(args.config)]
    for item in args.overrides:
        argv += ["--set", item]
    if args.data:
        argv += ["--data", str(args.data)]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    if args.resume:
        argv += ["--resume", args.resume]
    return argv


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a model on token shards (AdamW or Muon, MTP, aux-loss-free MoE balancing)",
        description="Pretrain from a run config (a preset name or YAML file with model:, train: and data: "
                    "sections). Writes RUN/config.yaml, metrics.jsonl, ledger.json, loss.png and "
                    "checkpoints/step-N/ (Hugging Face format + trainer_state/). SIGTERM or Ctrl-C saves a "
                    "checkpoint and exits; --resume continues exactly where a checkpoint left off.")
    p.add_argument("--config", default=None, help=f"preset name or YAML run config (default {DEFAULT_CONFIG}; "
                                                   "with --resume, the run's own config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--run-dir", dest="run", default="runs/pretrain", metavar="DIR",
                   help="run directory (default runs/pretrain)")
    p.add_argument("--data", metavar="DIR", help="token shard directory from `hemat data prepare` (data.path)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the run's newest checkpoint, or from CHECKPOINT (a step-N directory)")
    p.add_argument("--nproc", type=int, metavar="N", help="run N processes through torchrun (DDP or FSDP2)")
    p.set_defaults(func=run_pretrain)
    return {"pretrain"}
