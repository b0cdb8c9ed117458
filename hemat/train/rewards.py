"""Problems with verifiable answers and the rules that check them: the rewards of GRPO and the verifier
of distillation. As in DeepSeek-R1 (§2.2.2) there is no neural reward model, only checks a program makes
exactly:

- answer   the final answer, read after the reasoning, equals the reference: numerically ("1,234" =
           "1234", "1/2" = "0.5") or symbolically where sympy can decide (hemat.eval.answers)
- format   the response is `<think>reasoning</think>` followed by a non-empty answer
- code     the answer's program passes the problem's tests in the sandbox (hemat.eval.sandbox)
- overlong DAPO's soft length penalty: 0 up to max_tokens - buffer, then falling linearly to -1 at
           the cap, so that truncated rambling is discouraged without a cliff

Problems come from JSONL (one per line: GSM8K's {"question", "answer": "... #### 18"}, a plain
{"question", "answer": "18"}, or code: {"question" or "prompt", "tests", optional "entry_point"}) or
from hemat's embedded arithmetic generator (training side only: never a held-out question)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from hemat.data.jsonl import read_jsonl
from hemat.errors import HematError
from hemat.eval.answers import answers_match, extract_answer
from hemat.infer.reasoning import split_reasoning
from hemat.tokenizer import THINK_END, THINK_START

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


class ProblemFileError(HematError):
    """A problem file hemat cannot read; the message names the file, line and field."""


@dataclass
class Problem:
    id: str
    question: str
    answer: str | None = None  # the reference final answer (math)
    tests: str | None = None  # test code (code problems)
    entry_point: str | None = None  # HumanEval style: the tests define check(f), called on this function

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]


@dataclass
class Verdict:
    correct: bool  # the answer matched, or the tests passed
    formatted: bool  # <think>…</think> then an answer


# ---- the rules --------------------------------------------------------------------------------------------
def answer_part(text: str) -> str:
    """What follows the reasoning; a response cut off inside its reasoning has no answer ("")."""
    return split_reasoning(text)[1]


def format_ok(text: str) -> bool:
    """`<think>` first, one `</think>`, non-empty reasoning between them, then a non-empty answer."""
    text = text.strip()
    if not text.startswith(THINK_START):
        return False
    body = text[len(THINK_START):]
    if body.count(THINK_END) != 1 or THINK_START in body:
        return False
    reasoning, answer = body.split(THINK_END)
    return bool(reasoning.strip()) and bool(answer.strip())


def math_correct(text: str, reference: str) -> bool:
    """The final answer after the reasoning ("The answer is N", "#### N", \\boxed{}, else the last
    number) equals the reference."""
    return answers_match(extract_answer(answer_part(text)), reference)


def extract_code(text: str) -> str:
    """The first ```python block of the answer (or of any fence), else the whole answer."""
    answer = answer_part(text)
    blocks = _CODE_BLOCK.findall(answer)
    return blocks[0] if blocks else answer


def code_passes(text: str, tests: str, entry_point: str | None = None, timeout_s: float = 5.0) -> bool:
    """The answer's program, followed by the tests, runs to the end in the sandbox without an error."""
    from hemat.eval.sandbox import check_program

    code = extract_code(text)
    if not code.strip():
        return False
    return check_program(code, tests, entry_point, timeout_s=timeout_s).ok


def overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 for length <= max_tokens - buffer, then linear down to
    -factor at max_tokens, and -factor beyond it. buffer 0 turns it off."""
    if buffer <= 0:
        return 0.0
    if buffer > max_tokens:
        raise HematError(f"the overlong buffer ({buffer}) must not exceed max_tokens ({max_tokens})")
    free = max_tokens - buffer
    if length <= free:
        return 0.0
    if length >= max_tokens:
        return -factor
    return (free - length) / buffer * factor


def verify(problem: Problem, text: str, code_timeout_s: float = 5.0) -> Verdict:
    """Judge one response to a problem: its answer (or its code, by the tests) and its format."""
    if problem.tests is not None:
        correct = code_passes(text, problem.tests, problem.entry_point, code_timeout_s)
    elif problem.answer is not None:
        correct = math_correct(text, problem.answer)
    else:
        raise HematError(f"problem {problem.id} has neither an answer nor tests to check against")
    return Verdict(correct, format_ok(text))


def reward(verdict: Verdict, format_weight: float = 0.0) -> float:
    """1 for a correct answer, plus format_weight for the format (R1 sums an accuracy and a format reward)."""
    return float(verdict.correct) + format_weight * float(verdict.formatted)


# ---- problems ---------------------------------------------------------------------------------------------
def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Problems from JSONL: math ({"question", "answer"}; a GSM8K answer's final value follows "####")
    or code ({"question" or "prompt", "tests", optional "entry_point"}); "id" is optional."""
    path = Path(path)
    problems, seen = [], set()
    for lineno, record in read_jsonl(path, ProblemFileError, "problem file", "problems", limit):
        where = f"{path}:{lineno}"
        problem = _problem(record, where, f"{path.stem}-{lineno}")
        if problem.id in seen:
            raise ProblemFileError(f"{where}: duplicate id {problem.id!r}")
        seen.add(problem.id)
        problems.append(problem)
    return problems


def _problem(record, where: str, default_id: str) -> Problem:
    if not isinstance(record, dict):
        raise ProblemFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    question = record.get("question", record.get("prompt"))
    if not isinstance(question, str) or not question.strip():
        raise ProblemFileError(f"{where}: field 'question' (or 'prompt') must be a non-empty string")
    pid = str(record.get("id", default_id))
    if "tests" in record:
        tests, entry = record["tests"], record.get("entry_point")
        if not isinstance(tests, str) or not tests.strip():
            raise ProblemFileError(f"{where}: field 'tests' must be a non-empty string of Python code")
        if entry is not None and (not isinstance(entry, str) or not entry.isidentifier()):
            raise ProblemFileError(f"{where}: field 'entry_point' must be a Python identifier, got {entry!r}")
        return Problem(pid, question.strip(), tests=tests, entry_point=entry)
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ProblemFileError(f"{where}: field 'answer' must be a non-empty string or number (or give 'tests')")
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    answer = answer.strip().replace(",", "")
    if not answer:
        raise ProblemFileError(f"{where}: nothing after '####' in field 'answer'")
    return Problem(pid, question.strip(), answer=answer)


def embedded_problems(n: int, seed: int = 0, difficulty: int | list[int] | None = None) -> list[Problem]:
    """hemat's arithmetic word problems from the training side of the split (never eval questions).
    difficulty: one level (1-3), None for the generator's own mix, or a list of levels that share the n
    problems equally (a level listed twice gets twice the share), interleaved."""
    from hemat.data.synthetic import train_problems

    if not isinstance(difficulty, list):
        return [Problem(p.id, p.question, answer=str(p.answer)) for p in train_problems(n, seed, difficulty)]
    if not difficulty:
        raise HematError("difficulty: an empty list of levels")
    share = {level: math.ceil(n * difficulty.count(level) / len(difficulty)) for level in difficulty}
    # each level from its own seed, so that the levels' problems do not share names and numbers
    pools = {level: iter(embedded_problems(k, seed + 1000 * level, level)) for level, k in share.items()}
    return [next(pools[difficulty[i % len(difficulty)]]) for i in range(n)]
