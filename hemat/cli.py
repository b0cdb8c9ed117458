"""The `hemat` command line. Each subcommand lives in the module that implements it; that module
exposes `add_command(subparsers)`, which registers its parser(s), sets `func`, and returns the
names it registered. Only the chosen command's module is imported, so one command's heavy
dependencies (the server's, the evaluator's) never slow down or break another."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module that implements it, one-line help)
COMMANDS = {
    "tokenizer": ("hemat.tokenizer", "train a byte-level BPE tokenizer with a chat template"),
    "data": ("hemat.data.shards", "tokenise text, JSONL or Parquet into training shards"),
    "pretrain": ("hemat.train.pretrain", "pretrain a model (DeepSeek-V3 MoE + MTP, Llama, Qwen2)"),
    "sft": ("hemat.train.sft", "supervised fine-tuning on chat JSONL"),
    "distill": ("hemat.train.distill", "collect verified reasoning traces from a teacher endpoint"),
    "grpo": ("hemat.train.grpo", "reinforcement learning with verifiable rewards (GRPO)"),
    "eval": ("hemat.eval.tasks", "evaluate math, code and language tasks"),
    "generate": ("hemat.infer.cli", "generate text from a prompt"),
    "chat": ("hemat.infer.cli", "chat with a model in the terminal"),
    "serve": ("hemat.serve.app", "serve an OpenAI-compatible API and web chat"),
    "cost": ("hemat.cost", "training FLOPs, time and dollars; MFU from device-hours"),
    "export-gguf": ("hemat.model.gguf_io", "write a model as a GGUF file for llama.cpp (f16, q8_0, q4_0)"),
    "params": ("hemat.model.params", "parameter counts: total, active, embedding, MTP"),
    "convert": ("hemat.model.convert", "rewrite a checkpoint as fp32, bf16 or block-FP8 safetensors"),
    "quantize": ("hemat.model.convert", "write a weight-only int8/int4 checkpoint (compressed-tensors)"),
    "merge": ("hemat.model.adapter_io", "fold a LoRA adapter into its base model and write a full checkpoint"),
    "speedrun": ("hemat.speedrun", "the whole pipeline on a preset, with a report card"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser for `command` (its module imported); every other command is listed by name."""
    parser = argparse.ArgumentParser(
        prog="hemat",
        description="Build, reason-train, evaluate and self-host DeepSeek-style models, and see what each stage cost.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    registered: set[str] = set()
    if command in COMMANDS:
        module_name = COMMANDS[command][0]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("hemat"):
                raise
            module = None  # not part of this version yet
        if module is not None:
            registered = set(module.add_command(sub))
    for name, (_, help_text) in COMMANDS.items():
        if name not in registered:
            p = sub.add_parser(name, help=help_text, description=help_text)
            p.set_defaults(func=lambda args, name=name: sys.exit(f"hemat {name}: not available in this version of hemat yet"))
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    from hemat.errors import HematError

    try:
        result = args.func(args)
    except HematError as e:
        sys.exit(f"hemat {args.command}: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    if isinstance(result, int):
        sys.exit(result)


if __name__ == "__main__":
    main()
