"""`hemat distill`: reasoning traces from a teacher at any OpenAI-compatible endpoint (`hemat serve`, vLLM,
SGLang, DeepSeek's API) into chat JSONL for `hemat sft`, the way DeepSeek-R1 built its SFT data: sample,
verify, keep only what the verifier accepts (rejection sampling).

For each problem the teacher is asked up to --samples times; a response is accepted when its final
answer matches the reference (or its code passes the tests: rewards.verify) and, unless
--allow-no-reasoning, it came with reasoning. The reasoning is read from the response's
`reasoning_content` (DeepSeek, hemat serve) or `reasoning` (vLLM) field, else from `<think>…</think>`
inline in the content. The first --keep accepted responses become lines of OUT:

    {"id": ..., "messages": [{"role": "user", ...}, {"role": "assistant", "reasoning_content": ..., "content": ...}],
     "answer": ..., "teacher": ...}

Problems whose every sample was rejected go to OUT.rejected.jsonl. Both files are appended to, so a run
that stops (Ctrl-C, a crash, a rate limit) resumes where it left off: problems already in either file are
skipped; failed requests (after the client's retries) are not recorded and are tried again next time.
At most --concurrency requests are in flight.

Needs the official client: pip install 'hemat[distill]' (the `openai` package).

    hemat distill --base-url http://127.0.0.1:8000/v1 --teacher tiny --out traces.jsonl --limit 500
    hemat distill --base-url https://api.deepseek.com --teacher deepseek-reasoner --api-key $KEY \\
        --problems gsm8k_train.jsonl --out traces.jsonl --concurrency 16"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from hemat.errors import HematError
from hemat.infer.reasoning import split_reasoning
from hemat.train.rewards import Problem, embedded_problems, load_problems, verify


class TeacherError(HematError):
    """The endpoint refused the run as a whole (bad key, unknown model, unreachable)."""


@dataclass
class TeacherSettings:
    base_url: str
    model: str
    api_key: str = "none"
    temperature: float = 0.6  # R1's recommended sampling
    top_p: float = 0.95
    max_tokens: int = 4096
    samples: int = 4  # attempts per problem at most
    keep: int = 1  # accepted traces kept per problem
    concurrency: int = 8  # requests in flight
    timeout_s: float = 600.0
    max_retries: int = 3  # the client's own retries (with backoff) on 429, 5xx and connection errors
    require_reasoning: bool = True
    system_prompt: str | None = None

    def validate(self) -> None:
        for name in ("max_tokens", "samples", "keep", "concurrency"):
            if getattr(self, name) < 1:
                raise HematError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.keep > self.samples:
            raise HematError(f"--keep ({self.keep}) cannot exceed --samples ({self.samples})")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.timeout_s <= 0 or self.max_retries < 0:
            raise HematError("--temperature must be >= 0, --top-p in (0, 1], --timeout > 0, --max-retries >= 0")
        if not self.base_url.startswith(("http://", "https://")):
            raise HematError(f"--base-url must be an http(s) URL, got {self.base_url!r}")


def reasoning_and_answer(message) -> tuple[str | None, str]:
    """(reasoning, answer) of a chat completion message, whichever way the endpoint returns reasoning."""
    content = message.content or ""
    for field in ("reasoning_content", "reasoning"):
        value = getattr(message, field, None)
        if isinstance(value, str) and value.strip():
            return value.strip(), content.strip()
    reasoning, answer = split_reasoning(content)
    return (reasoning.strip() if reasoning else None), answer.strip()


def accept(problem: Problem, reasoning: str | None, answer: str, require_reasoning: bool = True) -> bool:
    """The verifier: the answer is right (rewards.verify) and, if required, reasoning came with it."""
    if require_reasoning and not reasoning:
        return False
    return verify(problem, f"<think>{reasoning or ''}</think>{answer}").correct


def trace_record(problem: Problem, reasoning: str | None, answer: str, teacher: str) -> dict:
    assistant = {"role": "assistant", "content": answer}
    if reasoning:
        assistant["reasoning_content"] = reasoning
    record = {"id": problem.id, "messages": [*problem.messages, assistant], "teacher": teacher}
    if problem.answer is not None:
        record["answer"] = problem.answer
    return record


# ---- resumable output -------------------------------------------------------------------------------------
def rejected_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".rejected.jsonl")


def done_ids(path: Path) -> set[str]:
    """The problem ids recorded in a JSONL file. A last line cut short by a kill is removed, so that
    appending starts on a fresh line (its problem is simply asked again)."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    ids = set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HematError(f"{path}:{lineno}: not a distill record (JSON with an 'id'); move the file aside or "
                             "choose another --out") from None
    return ids


# ---- the run ----------------------------------------------------------------------------------------------
def make_client(settings: TeacherSettings):
    try:
        import openai
    except ImportError:
        raise HematError("hemat distill needs the openai package: pip install 'hemat[distill]'") from None
    return openai.OpenAI(base_url=settings.base_url, api_key=settings.api_key or "none",
                         timeout=settings.timeout_s, max_retries=settings.max_retries)


def ask(client, problem: Problem, settings: TeacherSettings) -> dict:
    """Sample the teacher until `keep` responses are accepted or `samples` are spent."""
    import openai

    messages = ([{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []) + problem.messages
    accepted, attempts, usage = [], [], {"prompt_tokens": 0, "completion_tokens": 0}
    for _ in range(settings.samples):
        try:
            response = client.chat.completions.create(
                model=settings.model, messages=messages, temperature=settings.temperature, top_p=settings.top_p,
                max_tokens=settings.max_tokens)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise TeacherError(f"{settings.base_url} refused model {settings.model!r}: {e}") from None
        except openai.APITimeoutError as e:
            return {"problem": problem, "error": f"timed out after {settings.timeout_s:g} s: {e}", "usage": usage}
        except openai.APIConnectionError as e:
            raise TeacherError(f"cannot reach {settings.base_url}: {e}") from None
        except openai.APIError as e:  # after the client's retries: this problem is tried again next run
            return {"problem": problem, "error": f"{type(e).__name__}: {e}", "usage": usage}
        if response.usage:
            usage["prompt_tokens"] += response.usage.prompt_tokens or 0
            usage["completion_tokens"] += response.usage.completion_tokens or 0
        if not response.choices:
            attempts.append({"finish_reason": None, "answer": ""})
            continue
        choice = response.choices[0]
        reasoning, answer = reasoning_and_answer(choice.message)
        if accept(problem, reasoning, answer, settings.require_reasoning):
            accepted.append((reasoning, answer))
            if len(accepted) == settings.keep:
                break
        else:
            attempts.append({"finish_reason": choice.finish_reason, "answer": answer[-200:]})
    return {"problem": problem, "accepted": accepted, "attempts": attempts, "usage": usage}


def distill(problems: list[Problem], out: str | Path, settings: TeacherSettings, log=print) -> dict:
    """Collect verified traces for the problems not yet in OUT or OUT.rejected.jsonl; returns counts."""
    settings.validate()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rejected_file = rejected_path(out)
    done = done_ids(out) | done_ids(rejected_file)
    todo = [p for p in problems if p.id not in done]
    stats = {"problems": len(problems), "skipped": len(problems) - len(todo), "accepted": 0, "traces": 0,
             "rejected": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}
    log(f"distill: {len(todo)} problems to ask {settings.model} at {settings.base_url} "
        f"({stats['skipped']} already done)")
    client = make_client(settings)
    started = time.perf_counter()
    with open(out, "a", encoding="utf-8") as kept_f, open(rejected_file, "a", encoding="utf-8") as rejected_f, \
            ThreadPoolExecutor(settings.concurrency) as pool:
        queue, running = iter(todo), set()
        try:
            while True:
                while len(running) < 2 * settings.concurrency and (problem := next(queue, None)) is not None:
                    running.add(pool.submit(ask, client, problem, settings))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    result = future.result()
                    _record(result, kept_f, rejected_f, settings, stats)
                    handled = stats["accepted"] + stats["rejected"] + stats["failed"]
                    if handled % 50 == 0:
                        log(f"distill: {handled}/{len(todo)} asked, {stats['accepted']} accepted, "
                            f"{stats['rejected']} rejected, {stats['failed']} failed")
        finally:
            for future in running:
                future.cancel()
    stats["seconds"] = round(time.perf_counter() - started, 3)
    log(f"distill: {stats['accepted']} problems accepted ({stats['traces']} traces) → {out}; {stats['rejected']} "
        f"rejected → {rejected_file.name}; {stats['failed']} failed (asked again next run); "
        f"{stats['prompt_tokens'] + stats['completion_tokens']:,} tokens used")
    return stats


def _record(result: dict, kept_f, rejected_f, settings: TeacherSettings, stats: dict) -> None:
    for key in ("prompt_tokens", "completion_tokens"):
        stats[key] += result["usage"][key]
    problem = result["problem"]
    if "error" in result:
        stats["failed"] += 1
        return
    if result["accepted"]:
        for reasoning, answer in result["accepted"]:
            kept_f.write(json.dumps(trace_record(problem, reasoning, answer, settings.model), ensure_ascii=False) + "\n")
        stats["accepted"] += 1
        stats["traces"] += len(result["accepted"])
        kept_f.flush()
    else:
        rejected_f.write(json.dumps({"id": problem.id, "question": problem.question, "reference": problem.answer,
                                     "attempts": result["attempts"]}, ensure_ascii=False) + "\n")
        stats["rejected"] += 1
        rejected_f.flush()


# ---- CLI --------------------------------------------------------------------------------------------------
def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "distill", help="collect verified reasoning traces from a teacher endpoint into SFT JSONL",
        description="Ask a teacher model at an OpenAI-compatible endpoint to solve problems, keep the responses "
                    "whose answer the verifier accepts (rejection sampling), and append them to --out as chat JSONL "
                    "for `hemat sft`. Resumable: problems already in --out or its .rejected.jsonl are skipped. "
                    "Needs pip install 'hemat[distill]'.")
    p.add_argument("--base-url", required=True, help="the endpoint, e.g. http://127.0.0.1:8000/v1 or https://api.deepseek.com")
    p.add_argument("--teacher", "--model-name", dest="teacher", required=True,
                   help="the model id to request, e.g. deepseek-reasoner")
    p.add_argument("--api-key", default=os.environ.get("HEMAT_TEACHER_API_KEY"),
                   help="API key (default: $HEMAT_TEACHER_API_KEY)")
    p.add_argument("--out", required=True, metavar="FILE", help="output chat JSONL (appended to)")
    p.add_argument("--problems", metavar="FILE", help="problems JSONL: {question, answer} per line, GSM8K's "
                                                      "'... #### N' answers too (default: embedded arithmetic problems)")
    p.add_argument("--limit", type=int, metavar="N", help="the first N problems (embedded: default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded problems (default 0)")
    p.add_argument("--samples", type=int, default=4, help="attempts per problem at most (default 4)")
    p.add_argument("--keep", type=int, default=1, help="accepted traces kept per problem (default 1)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per response (default 4096)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--max-retries", type=int, default=3, help="client retries on 429/5xx/connection errors (default 3)")
    p.add_argument("--system-prompt", help="a system message to send first")
    p.add_argument("--allow-no-reasoning", action="store_true",
                   help="accept correct answers that came without reasoning (non-reasoning teachers)")
    p.set_defaults(func=_distill_command)
    return {"distill"}


def _distill_command(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise HematError(f"--limit must be at least 1, got {args.limit}")
    problems = (load_problems(args.problems, args.limit) if args.problems
                else embedded_problems(args.limit or 1000, args.seed))
    settings = TeacherSettings(
        base_url=args.base_url, model=args.teacher, api_key=args.api_key or "none", temperature=args.temperature,
        top_p=args.top_p, max_tokens=args.max_tokens, samples=args.samples, keep=args.keep,
        concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.max_retries,
        require_reasoning=not args.allow_no_reasoning, system_prompt=args.system_prompt)
    stats = distill(problems, args.out, settings)
    return 1 if stats["failed"] and not stats["accepted"] else 0
