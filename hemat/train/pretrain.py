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
from hemat.train.config import RunConfig
from hemat.train.stage import Stage, add_run_arguments, resolve_config, tokenizer_files


def pretrain(config: RunConfig, run_dir: str | Path, resume: str | None = None) -> dict:
    import torch  # imported here so that `hemat --help` stays fast

    from hemat.data.loader import TokenLoader
    from hemat.model.transformer import CausalLM

    train, data = config.train, config.data
    if not data.path:
        raise HematError("no training data: set data.path in the config or pass --data DIR "
                         "(make shards with `hemat data prepare`)")
    with Stage("pretrain", config, run_dir, resume) as stage:
        env = stage.env
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
        made_with = loader.manifest.get("tokenizer", {}).get("path")  # the tokenizer's folder or its tokenizer.json
        folder = Path(made_with).parent if made_with and Path(made_with).is_file() else made_with
        return stage.fit(model, loader, val_batches=val_batches, bytes_per_token=bytes_per_token,
                         extra_files=tokenizer_files(folder) if folder else ())


def run_pretrain(args: argparse.Namespace) -> int | None:
    if args.nproc and "LOCAL_RANK" not in os.environ:
        from hemat.train.parallel import launch

        launch(args.nproc, _argv_without_nproc(args))
    config = resolve_config(args, {"data": "data.path", "steps": "train.steps"})
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
    add_run_arguments(p, "train", "runs/pretrain")
    p.add_argument("--data", metavar="DIR", help="token shard directory from `hemat data prepare` (data.path)")
    p.add_argument("--nproc", type=int, metavar="N", help="run N processes through torchrun (DDP or FSDP2)")
    p.set_defaults(func=run_pretrain)
    return {"pretrain"}
