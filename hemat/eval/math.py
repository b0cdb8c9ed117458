"""Math word problems scored by exact final answer: GSM8K-format JSONL files and hemat's embedded
held-out arithmetic problems.

A base model completes "Question: ...\\nSolution:", the format of hemat's pretraining documents; a chat
model gets the question as the user message, and its reasoning (<think>...</think>) is split off before
the answer is read from what remains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hemat.data.jsonl import read_jsonl
from hemat.data.synthetic import eval_problems, format_prompt
from hemat.errors import HematError
from hemat.eval.answers import answers_match, extract_answer
from hemat.infer.reasoning import split_reasoning

BASE_STOP = ["\nQuestion:"]  # a base model that goes on writes the next document's question
ARITH_DEFAULT_N = 200


class MathDataError(HematError):
    """A math problem file hemat cannot read; the message names the file and line."""


@dataclass
class MathProblem:
    id: str
    question: str
    answer: str  # the reference final answer, e.g. "18"


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[MathProblem]:
    """GSM8K's JSONL: one {"question": ..., "answer": "...worked solution...\\n#### 18"} per line."""
    path = Path(path)
    return [_gsm8k_problem(record, f"{path}:{lineno}", f"{path.stem}-{lineno}")
            for lineno, record in read_jsonl(path, MathDataError, "GSM8K file", "problems", limit)]


def _gsm8k_problem(record, where: str, default_id: str) -> MathProblem:
    if not isinstance(record, dict):
        raise MathDataError(f"{where}: expected a JSON object with question and answer, got {type(record).__name__}")
    for field in ("question", "answer"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise MathDataError(f"{where}: field {field!r} must be a non-empty string")
    if "####" not in record["answer"]:
        raise MathDataError(f"{where}: field 'answer' does not end with '#### <final answer>'")
    final = record["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise MathDataError(f"{where}: nothing after '####' in field 'answer'")
    return MathProblem(str(record.get("id", default_id)), record["question"].strip(), final)


def arith_problems(limit: int | None = None, seed: int = 0) -> list[MathProblem]:
    """The embedded arithmetic problems of the held-out split (never in hemat's training data)."""
    return [MathProblem(p.id, p.question, str(p.answer))
            for p in eval_problems(limit if limit is not None else ARITH_DEFAULT_N, seed)]


def math_prompt(problem: MathProblem, chat: bool) -> str | list[dict]:
    if chat:
        return [{"role": "user", "content": problem.question}]
    return format_prompt(problem.question)


def final_answer(output: str, chat: bool) -> str | None:
    """The answer in a model's output; for a chat model, read from the part after its reasoning."""
    if chat:
        _, output = split_reasoning(output)
    return extract_answer(output)


def score_math(problems: list[MathProblem], outputs: list[str], chat: bool) -> tuple[dict, list[dict]]:
    """Accuracy of the final answers, and one record per problem."""
    if len(outputs) != len(problems):
        raise HematError(f"{len(problems)} problems but {len(outputs)} outputs")
    records, correct = [], 0
    for problem, output in zip(problems, outputs):
        predicted = final_answer(output, chat)
        ok = answers_match(predicted, problem.answer)
        correct += ok
        records.append({"id": problem.id, "prompt": problem.question, "output": output, "extracted": predicted,
                        "reference": problem.answer, "correct": ok})
    return {"accuracy": correct / len(problems) if problems else 0.0}, records
