"""`hemat speedrun --preset cpu-tiny`: the whole pipeline on the embedded default, with nothing from the
network: generate the arithmetic corpus, train the tokenizer, tokenise into shards, pretrain a
DeepSeek-V3-style model (MLA + MoE + MTP), and write a report card with what every stage cost.

    runs/NAME/corpus/      generated JSONL          runs/NAME/pretrain/   metrics, checkpoints, loss.png
    runs/NAME/tokenizer/   tokenizer.json, ...      runs/NAME/ledger.json every stage's cost
    runs/NAME/data/        token shards + manifest  runs/NAME/report.md   the report card"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from hemat.errors import HematError


@dataclass
class SpeedrunConfig:
    problems: int = 20000  # training-side word problems in the pretraining corpus
    stdlib_code: bool = False  # also pretrain on the Python standard library's own source
    stdlib_bytes: int = 2_000_000
    vocab_size: int = 2048  # tokenizer vocabulary; the model's vocab_size follows the trained tokenizer
    seed: int = 0

    def validate(self) -> None:
        if self.problems < 100:
            raise HematError(f"speedrun.problems must be at least 100, got {self.problems}")
        if self.vocab_size < 300:
            raise HematError(f"speedrun.vocab_size must be at least 300, got {self.vocab_size}")


def speedrun(preset: str, out: str | Path, overrides: list[str] = ()) -> dict:
    from hemat import cost
    from hemat.data.shards import prepare_shards
    from hemat.data.synthetic import write_corpus
    from hemat.model.params import count_parameters
    from hemat.tokenizer import train_tokenizer
    from hemat.train.config import load_config
    from hemat.train.pretrain import pretrain

    out = Path(out)
    if (out / "pretrain").exists():
        raise HematError(f"{out} already holds a speedrun; choose another --out")
    config = load_config(preset, list(overrides), schemas={"speedrun": SpeedrunConfig})
    run = config.sections["speedrun"]
    # the data stages go into the pretraining run's ledger, which the trainer then extends, so every
    # checkpoint's ledger covers the whole pipeline up to it
    ledger = cost.Ledger(out / "pretrain")
    device = cost.detect_device()
    started = time.perf_counter()

    def account(stage: str, seconds: float, tokens: int = 0) -> None:
        ledger.update_stage(stage, tokens=tokens, flops=0.0, wall_seconds=seconds, device=device,
                            device_count=cost.devices_in_use(device))
        ledger.save()

    _banner(f"1/4 corpus: {run.problems:,} arithmetic word problems" + (" + Python stdlib source" if run.stdlib_code else ""))
    t0 = time.perf_counter()
    files = write_corpus(out / "corpus", run.problems, run.seed, run.stdlib_code, run.stdlib_bytes)
    account("corpus", time.perf_counter() - t0)

    _banner(f"2/4 tokenizer: byte-level BPE, {run.vocab_size:,} tokens")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(files, run.vocab_size, out / "tokenizer")
    account("tokenizer", time.perf_counter() - t0)

    _banner("3/4 data: tokenise into shards")
    t0 = time.perf_counter()
    manifest = prepare_shards(files, out / "tokenizer", out / "data", val_fraction=0.02)
    account("data", time.perf_counter() - t0, tokens=manifest["total_tokens"])

    _banner("4/4 pretrain")
    config = load_config(preset, [*overrides, f"model.vocab_size={tokenizer.vocab_size}",
                                  f"data.path={out / 'data'}"], schemas={"speedrun": SpeedrunConfig})
    result = pretrain(config, out / "pretrain")
    ledger = cost.Ledger(out)
    ledger.inherit(cost.Ledger.load(out / "pretrain"))
    ledger.save()

    wall = time.perf_counter() - started
    counts = count_parameters(config.model)
    report = write_speedrun_report(out, preset, config, counts, manifest, result, ledger, wall)
    _banner(f"done in {wall / 60:.1f} min, {ledger.total_dollars:.4f} USD: {report}")
    return {"pretrain": result, "report": str(report), "wall_seconds": wall, "dollars": ledger.total_dollars}


def write_speedrun_report(out: Path, preset: str, config, counts, manifest: dict, result: dict, ledger, wall: float) -> Path:
    from hemat.model.params import human
    from hemat.report import markdown_table, write_report

    model, train = config.model, config.train
    pretrain_cost = ledger.stage("pretrain")
    summary = markdown_table(["", ""], [
        ["preset", f"`{preset}`"],
        ["wall time", f"{wall / 60:.1f} min"],
        ["total cost", f"${ledger.total_dollars:.4f}"],
        ["final train loss", _fmt(result.get("loss"))],
        ["validation loss", _fmt(result.get("val_loss"))],
        ["validation bits per byte", _fmt(result.get("val_bpb"), 3)],
        ["checkpoint", f"`{result.get('checkpoint')}`"],
    ])
    params = markdown_table(["parameters", "count"], [
        ["main model", human(counts.main)], ["active per token", human(counts.active)],
        ["embedding", human(counts.embedding)], ["MTP (unique)", human(counts.mtp)],
    ])
    architecture = (
        f"{model.model_type}: {model.num_hidden_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads, MLA (q_lora {model.q_lora_rank}, kv_lora {model.kv_lora_rank}, "
        f"rope {model.qk_rope_head_dim}), {model.n_routed_experts} routed + {model.n_shared_experts} shared "
        f"experts, top-{model.num_experts_per_tok}, {model.num_nextn_predict_layers} MTP module(s), "
        f"vocabulary {model.vocab_size}."
    )
    splits = manifest["splits"]
    data = markdown_table(["split", "tokens", "bytes per token"], [
        [name, f"{s['tokens']:,}", _fmt(s.get("bytes_per_token"), 2)] for name, s in splits.items()
    ])
    training = markdown_table(["", ""], [
        ["steps", f"{train.steps} × {train.batch_tokens:,} tokens ({train.seq_len}-token sequences)"],
        ["optimizer", f"{train.optimizer}, peak LR {train.lr:g}, {train.schedule} schedule"],
        ["MTP weight λ / bias speed γ / balance α", f"{train.mtp_weight} / {train.bias_update_speed} / {train.balance_loss_alpha}"],
        ["throughput", f"{pretrain_cost.tokens_per_second:,.0f} tokens/s" if pretrain_cost else "-"],
        ["MFU (vs measured CPU matmul rate)", f"{pretrain_cost.mfu:.1%}" if pretrain_cost and pretrain_cost.mfu else "-"],
    ])
    costs = markdown_table(["stage", "tokens", "wall", "device-hours", "MFU", "dollars"], [
        [s.stage, human(s.tokens), f"{s.wall_seconds:.1f}s", f"{s.device_hours:.4f}",
         f"{s.mfu:.1%}" if s.mfu else "-", f"${s.dollars:.5f}"] for s in ledger.stages
    ])
    return write_report(out / "report.md", "hemat speedrun report card", [
        ("Summary", summary),
        ("Model", architecture + "\n\n" + params),
        ("Data", f"{manifest['documents']:,} documents.\n\n" + data),
        ("Pretraining", training + "\n\n![loss](pretrain/loss.png)"),
        ("Cost per stage", costs + f"\n\nDevice: {ledger.stages[-1].device}; price "
                                   f"${ledger.stages[-1].price_per_device_hour}/device-hour (see hemat/cost.py)."),
    ])


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _banner(text: str) -> None:
    print(f"\n== hemat speedrun: {text}", flush=True)


def run_speedrun(args: argparse.Namespace) -> None:
    out = args.out or f"runs/speedrun-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    speedrun(args.preset, out, args.overrides)


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "speedrun", help="the whole pipeline on a preset, with a report card",
        description="Generate the embedded arithmetic corpus, train a tokenizer, make token shards, pretrain a "
                    "DeepSeek-V3-style model and write RUN/report.md with every stage's cost. Needs no network.")
    p.add_argument("--preset", default="cpu-tiny", help="preset name or YAML run config (default cpu-tiny)")
    p.add_argument("--out", help="run directory (default runs/speedrun-PRESET-TIMESTAMP)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 or --set speedrun.problems=5000")
    p.set_defaults(func=run_speedrun)
    return {"speedrun"}
