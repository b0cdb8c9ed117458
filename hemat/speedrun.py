"""`hemat speedrun --preset cpu-tiny`: the whole R1-style pipeline on the embedded default, with nothing
from the network: generate the arithmetic corpus, train the tokenizer, tokenise into shards, pretrain a
DeepSeek-V3-style model (MLA + MoE + MTP), fine-tune it on worked solutions as chats (SFT), evaluate it
on held-out problems, improve it with GRPO against the verifiable answer, evaluate again, and write a
report card with the accuracy before and after RL, sample traces and what every stage cost.

    runs/NAME/corpus/      generated JSONL          runs/NAME/sft/        SFT run (metrics, checkpoint, loss.png)
    runs/NAME/tokenizer/   tokenizer.json, ...      runs/NAME/grpo/       GRPO run (metrics, checkpoint, grpo.png)
    runs/NAME/data/        token shards + manifest  runs/NAME/eval/       eval results of the SFT and GRPO models
    runs/NAME/pretrain/    metrics, checkpoints     runs/NAME/ledger.json every stage's cost
    runs/NAME/report.md    the report card          runs/NAME/accuracy.png"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from hemat.errors import HematError

DRAFT_TIMING_PROMPTS = 4  # eval questions decoded one at a time with and without the MTP drafts


@dataclass
class SpeedrunConfig:
    problems: int = 20000  # training-side word problems in the pretraining corpus
    stdlib_code: bool = False  # also pretrain on the Python standard library's own source
    stdlib_bytes: int = 2_000_000
    vocab_size: int = 2048  # tokenizer vocabulary; the model's vocab_size follows the trained tokenizer
    seed: int = 0
    eval_problems: int = 200  # held-out problems the SFT and GRPO models are scored on (greedy)
    eval_max_tokens: int = 256
    traces: int = 3  # sample reasoning traces shown before and after GRPO

    def validate(self) -> None:
        if self.problems < 100:
            raise HematError(f"speedrun.problems must be at least 100, got {self.problems}")
        if self.vocab_size < 300:
            raise HematError(f"speedrun.vocab_size must be at least 300, got {self.vocab_size}")
        for key in ("eval_problems", "eval_max_tokens"):
            if getattr(self, key) < 1:
                raise HematError(f"speedrun.{key} must be positive, got {getattr(self, key)}")
        if self.traces < 0:
            raise HematError(f"speedrun.traces must not be negative, got {self.traces}")


def _schemas() -> dict:
    from hemat.train import grpo, sft

    # lora: (rank 0 by default) LoRA instead of full fine-tuning in the SFT and GRPO stages
    return {"speedrun": SpeedrunConfig, **sft.SCHEMAS, **grpo.SCHEMAS}


def speedrun(preset: str, out: str | Path, overrides: list[str] = ()) -> dict:
    from hemat import cost
    from hemat.data.shards import prepare_shards
    from hemat.data.synthetic import write_corpus
    from hemat.model.params import count_parameters
    from hemat.tokenizer import train_tokenizer
    from hemat.train.config import load_config
    from hemat.train.grpo import run_grpo
    from hemat.train.pretrain import pretrain
    from hemat.train.sft import run_sft

    out = Path(out)
    if (out / "pretrain").exists():
        raise HematError(f"{out} already holds a speedrun; choose another --out")
    config = load_config(preset, list(overrides), schemas=_schemas())  # every stage's settings checked up front
    run = config.sections["speedrun"]
    # the data stages go into the pretraining run's ledger, which the trainer then extends, so every
    # checkpoint's ledger covers the whole pipeline up to it
    ledger = cost.Ledger(out / "pretrain")
    device = cost.detect_device()
    started = time.perf_counter()

    def account(ledger: cost.Ledger, stage: str, seconds: float, tokens: int = 0) -> None:
        ledger.update_stage(stage, tokens=tokens, flops=0.0, wall_seconds=seconds, device=device,
                            device_count=cost.devices_in_use(device))
        ledger.save()

    _banner(f"1/8 corpus: {run.problems:,} arithmetic word problems" + (" + Python stdlib source" if run.stdlib_code else ""))
    t0 = time.perf_counter()
    files = write_corpus(out / "corpus", run.problems, run.seed, run.stdlib_code, run.stdlib_bytes)
    account(ledger, "corpus", time.perf_counter() - t0)

    _banner(f"2/8 tokenizer: byte-level BPE, {run.vocab_size:,} tokens")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(files, run.vocab_size, out / "tokenizer")
    account(ledger, "tokenizer", time.perf_counter() - t0)

    _banner("3/8 data: tokenise into shards")
    t0 = time.perf_counter()
    manifest = prepare_shards(files, out / "tokenizer", out / "data", val_fraction=0.02)
    account(ledger, "data", time.perf_counter() - t0, tokens=manifest["total_tokens"])

    _banner("4/8 pretrain")
    config = load_config(preset, [*overrides, f"model.vocab_size={tokenizer.vocab_size}",
                                  f"data.path={out / 'data'}"], schemas=_schemas())
    pretrained = pretrain(config, out / "pretrain")

    _banner("5/8 SFT: worked solutions as chats, <think> steps </think> then the answer")
    tuned = run_sft(config, out / "sft", model_dir=pretrained["checkpoint"])

    evals = {}
    _banner(f"6/8 eval: the SFT model on {run.eval_problems} held-out problems")
    evals["sft"] = evaluate_arith(tuned["checkpoint"], out / "eval" / "sft", run)

    _banner("7/8 GRPO: reinforcement learning against the verifiable answer")
    reinforced = run_grpo(config, out / "grpo", model_dir=tuned["checkpoint"])

    _banner(f"8/8 eval: the GRPO model on the same {run.eval_problems} problems")
    evals["grpo"] = evaluate_arith(reinforced["checkpoint"], out / "eval" / "grpo", run)

    ledger = cost.Ledger(out)
    ledger.inherit(cost.Ledger.load(out / "grpo"))
    for name, result in evals.items():
        account(ledger, f"eval ({name} model)", result["seconds"], result["tokens"])
    wall = time.perf_counter() - started
    counts = count_parameters(config.model)
    plot_accuracy(evals, out / "accuracy.png")
    report = write_speedrun_report(out, preset, config, counts, manifest, pretrained, evals, ledger, wall)
    gain = evals["grpo"]["accuracy"] - evals["sft"]["accuracy"]
    _banner(f"done in {wall / 60:.1f} min, {ledger.total_dollars:.4f} USD; held-out accuracy SFT "
            f"{evals['sft']['accuracy']:.1%} -> GRPO {evals['grpo']['accuracy']:.1%} ({gain * 100:+.1f} points): {report}")
    return {"pretrain": pretrained, "sft": tuned, "grpo": reinforced, "eval": evals, "report": str(report),
            "wall_seconds": wall, "dollars": ledger.total_dollars}


def evaluate_arith(checkpoint: str | Path, out_dir: Path, run: SpeedrunConfig) -> dict:
    """Greedy accuracy of a checkpoint on the held-out arithmetic problems (what `hemat eval --tasks
    arith` measures), overall and per difficulty level; writes out_dir/results.{json,md}, samples.jsonl."""
    from hemat.data.synthetic import eval_problems
    from hemat.eval.tasks import EvalContext, EvalSettings, TaskSpec, results_summary, run_tasks, write_results
    from hemat.model.hf import from_pretrained
    from hemat.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    model, tokenizer = from_pretrained(checkpoint), load_tokenizer(checkpoint)
    settings = EvalSettings(limit=run.eval_problems, max_tokens=run.eval_max_tokens, batch_size=64)
    ctx = EvalContext(model, tokenizer, settings, str(checkpoint))
    specs = [TaskSpec("arith", None, "arith")]
    results = run_tasks(ctx, specs, log=lambda _: None)
    records = results["arith"].records
    by_level: dict[int, list[bool]] = {}
    for problem, record in zip(eval_problems(run.eval_problems), records):
        record["question"], record["level"] = problem.question, problem.difficulty
        by_level.setdefault(problem.difficulty, []).append(record["correct"])
    seconds = time.perf_counter() - t0
    write_results(out_dir, results_summary(ctx, specs, results, 0.0, seconds), results)
    accuracy = results["arith"].metrics["accuracy"]
    print(f"accuracy {accuracy:.1%} on {len(records)} problems ("
          + ", ".join(f"level {k}: {sum(v)}/{len(v)}" for k, v in sorted(by_level.items())) + ")", flush=True)
    stats = ctx.engine.stats()  # the MTP drafts' record over the whole eval (greedy decoding)
    drafts = {k: stats[k] for k in ("spec_rounds", "spec_drafted", "spec_accepted") if k in stats}
    if drafts.get("spec_drafted"):
        drafts.update(draft_speedup(model, tokenizer, [r["question"] for r in records[:DRAFT_TIMING_PROMPTS]]))
    return {"accuracy": accuracy, "n": len(records), "seconds": seconds, "drafts": drafts,
            "by_level": {k: sum(v) / len(v) for k, v in sorted(by_level.items())},
            "tokens": sum(len(tokenizer.encode(r["output"])) for r in records), "records": records}


def draft_speedup(model, tokenizer, prompts: list[str], max_tokens: int = 64) -> dict:
    """What the MTP drafts buy on this model: greedy tokens/s at batch 1 without them, with them every step
    (speculative "mtp") and where measured to pay ("auto", as the evals decode), each the better of two
    alternated passes (the less disturbed by other load)."""
    from hemat.infer.engine import Engine
    from hemat.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engines = {mode: Engine(model, tokenizer, max_batch_size=1, speculative=mode) for mode in ("off", "mtp", "auto")}
    best = dict.fromkeys(engines, 0.0)
    for _ in range(2):
        for mode, engine in engines.items():
            start = time.perf_counter()
            tokens = sum(len(engine.generate(prompt, params)[0].outputs[0].token_ids) for prompt in prompts)
            best[mode] = max(best[mode], tokens / (time.perf_counter() - start))
    return {"plain_tok_s": best["off"], "mtp_tok_s": best["mtp"], "auto_tok_s": best["auto"]}


def plot_accuracy(evals: dict, png: Path) -> None:
    """Held-out accuracy of the SFT and GRPO models, overall and per level, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hemat.report import save_figure

    groups = ["all"] + [f"level {k}" for k in evals["sft"]["by_level"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.38
    for i, (name, result) in enumerate(evals.items()):
        values = [result["accuracy"], *result["by_level"].values()]
        bars = ax.bar([g + (i - 0.5) * width for g in range(len(groups))], [v * 100 for v in values], width,
                      label=f"{name.upper()} model")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(f"greedy accuracy, % of {evals['sft']['n']} held-out problems")
    ax.set_title("Held-out accuracy before and after GRPO")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, png)


def _drafts_line(drafts: dict) -> str:
    accepted, drafted, rounds = drafts["spec_accepted"], drafts["spec_drafted"], drafts["spec_rounds"]
    plain = drafts["plain_tok_s"]
    return (f"{accepted / drafted:.1%} ({accepted:,} of {drafted:,}), "
            f"{1 + accepted / rounds:.2f} tokens per draft-and-verify round; batch-1 greedy decoding "
            f"{drafts['mtp_tok_s'] / plain:.2f}× plain drafting every step, {drafts['auto_tok_s'] / plain:.2f}× "
            f"with speculative auto ({drafts['mtp_tok_s']:,.0f}, {drafts['auto_tok_s']:,.0f} vs {plain:,.0f} tokens/s)")


def write_speedrun_report(out: Path, preset: str, config, counts, manifest: dict, result: dict, evals: dict,
                          ledger, wall: float) -> Path:
    from hemat.model.params import human
    from hemat.report import markdown_table, write_report

    model, train = config.model, config.train
    sft, grpo, run = config.sections["sft"], config.sections["grpo"], config.sections["speedrun"]
    sft_train, grpo_train = config.train_for("sft"), config.train_for("grpo")
    pretrain_cost = ledger.stage("pretrain")
    before, after = evals["sft"], evals["grpo"]
    summary = markdown_table(["", ""], [
        ["preset", f"`{preset}`"],
        ["wall time", f"{wall / 60:.1f} min"],
        ["total cost", f"${ledger.total_dollars:.4f}"],
        ["pretraining validation loss", _fmt(result.get("val_loss"))],
        ["pretraining validation bits per byte", _fmt(result.get("val_bpb"), 3)],
        [f"held-out accuracy after SFT ({before['n']} problems, greedy)", f"{before['accuracy']:.1%}"],
        ["held-out accuracy after GRPO (same problems)", f"{after['accuracy']:.1%} "
                                                        f"({(after['accuracy'] - before['accuracy']) * 100:+.1f} points)"],
        *[[f"MTP drafts accepted in the {name.upper()} eval", _drafts_line(e["drafts"])]
          for name, e in evals.items() if e.get("drafts", {}).get("spec_drafted")],
        ["final checkpoint", "`grpo/checkpoints/` (a Hugging Face checkpoint with its tokenizer)"],
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
    fine_tuning = markdown_table(["", ""], [
        ["data", f"{sft.data}" if sft.data else f"{sft.problems:,} embedded training-side problems as chats"],
        ["steps", f"{sft_train.steps} × {sft_train.batch_tokens:,} tokens, loss on the assistant turns only"],
        ["optimizer", f"{sft_train.optimizer}, peak LR {sft_train.lr:g}, {sft_train.schedule} schedule"],
    ])
    rl = markdown_table(["", ""], [
        ["variant", f"{grpo.variant} (ε {grpo.epsilon}/{grpo.epsilon_high}, β {grpo.beta}, "
                    f"{grpo.loss_aggregation} loss, dynamic sampling {'on' if grpo.dynamic_sampling else 'off'})"],
        ["rollouts", f"{grpo_train.steps} steps × {grpo.prompts_per_step} prompts × G={grpo.group_size} samples, "
                     f"temperature {grpo.temperature}, at most {grpo.max_new_tokens} new tokens"],
        ["reward", f"1 for the right final answer + {grpo.format_reward} for the <think> format (rules, no model)"],
        ["optimizer", f"{grpo_train.optimizer}, LR {grpo_train.lr:g}, {grpo_train.schedule} schedule"],
    ])
    levels = list(before["by_level"])
    accuracy = markdown_table(["model", "all", *[f"level {k}" for k in levels]], [
        [name.upper(), f"{e['accuracy']:.1%}", *[f"{e['by_level'][k]:.1%}" for k in levels]]
        for name, e in evals.items()
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
        ("SFT", fine_tuning + "\n\n![SFT loss](sft/loss.png)"),
        ("GRPO", rl + "\n\n![GRPO](grpo/grpo.png)"),
        ("Held-out accuracy", f"Greedy answers to {before['n']} held-out problems (never in any training data; "
                              f"`hemat eval --tasks arith`), scored by the final answer.\n\n"
                              + accuracy + "\n\n![accuracy](accuracy.png)"),
        ("Sample traces before and after GRPO", _traces(before["records"], after["records"], run.traces)),
        ("Cost per stage", costs + f"\n\nDevice: {ledger.stages[-1].device}; price "
                                   f"${ledger.stages[-1].price_per_device_hour}/device-hour (see hemat/cost.py)."),
    ])


def _traces(before: list[dict], after: list[dict], n: int) -> str:
    """The first n held-out problems, each with the SFT model's and the GRPO model's response."""
    blocks = []
    for b, a in list(zip(before, after))[:n]:
        blocks.append(f"**{b['question']}** (level {b['level']}, answer {b['reference']})\n")
        for name, record in (("SFT", b), ("GRPO", a)):
            verdict = "right" if record["correct"] else "wrong"
            blocks.append(f"{name} ({verdict}):\n\n```\n{record['output'].strip()}\n```\n")
    return "\n".join(blocks) if blocks else "(speedrun.traces is 0)"


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _banner(text: str) -> None:
    print(f"\n== hemat speedrun: {text}", flush=True)


def run_speedrun(args: argparse.Namespace) -> None:
    out = args.out or f"runs/speedrun-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    speedrun(args.preset, out, args.overrides)


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "speedrun", help="the whole pipeline (pretrain, SFT, GRPO, eval) on a preset, with a report card",
        description="Generate the embedded arithmetic corpus, train a tokenizer, make token shards, pretrain a "
                    "DeepSeek-V3-style model, fine-tune it (SFT), evaluate it on held-out problems, train it with "
                    "GRPO, evaluate it again, and write RUN/report.md with the accuracy before and after RL, "
                    "sample traces and every stage's cost. Needs no network.")
    p.add_argument("--preset", default="cpu-tiny", help="preset name or YAML run config (default cpu-tiny)")
    p.add_argument("--out", help="run directory (default runs/speedrun-PRESET-TIMESTAMP)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 or --set speedrun.problems=5000")
    p.set_defaults(func=run_speedrun)
    return {"speedrun"}
