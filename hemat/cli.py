"""The `hemat` command line. Each subcommand lives in the module that implements it; that module
exposes `add_command(subparsers)`, which registers its parser and sets `func`."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that implements it (imported lazily so `hemat --help` stays fast)
COMMANDS = {
    "tokenizer": "hemat.tokenizer",
    "data": "hemat.data.shards",
    "pretrain": "hemat.train.pretrain",
    "sft": "hemat.train.sft",
    "distill": "hemat.train.distill",
    "grpo": "hemat.train.grpo",
    "eval": "hemat.eval.tasks",
    "generate": "hemat.infer.cli",
    "chat": "hemat.infer.cli",
    "serve": "hemat.serve.app",
    "cost": "hemat.cost",
    "params": "hemat.model.params",
    "speedrun": "hemat.speedrun",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hemat",
        description="Build, reason-train, evaluate and self-host DeepSeek-style models, and see what each stage cost.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    registered: set[str] = set()
    for name, module_name in COMMANDS.items():
        if name in registered:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if not e.name or not e.name.startswith("hemat"):
                raise
            _add_pending(sub, name)
            registered.add(name)
            continue
        registered.update(module.add_command(sub))
    return parser


def _add_pending(sub, name: str) -> None:
    p = sub.add_parser(name, help="(not available in this version yet)")
    p.set_defaults(func=lambda args: sys.exit(f"hemat {name}: not available in this version of hemat yet"))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
