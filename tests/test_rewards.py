"""Rule-based rewards: answers (numeric and symbolic), the format, code judged in the sandbox, DAPO's
overlong shaping, and the problem files they read."""

import json

import pytest

from hemat.train.rewards import (
    Problem, ProblemFileError, Verdict, code_passes, embedded_problems, extract_code, format_ok, load_problems,
    math_correct, overlong_penalty, reward, verify,
)


def test_math_answers_numeric_and_symbolic():
    assert math_correct("<think>\n6 * 7 = 42\n</think>\nThe answer is 42.", "42")
    assert math_correct("<think>sum</think>The answer is 1,234.", "1234")
    assert math_correct("<think>half</think>\\boxed{\\frac{1}{2}}", "0.5")
    assert math_correct("<think>expand</think>\\boxed{x + x}", "2*x")  # sympy decides
    assert math_correct("<think>a</think>#### 3.50", "3.5")
    assert not math_correct("<think>6 * 7 = 42</think>The answer is 41.", "42")
    assert not math_correct("<think>The answer is 42", "42")  # cut off inside the reasoning: no answer yet
    assert not math_correct("<think>6 * 7 = 42</think>I do not know.", "42")
    assert math_correct("The answer is 42.", "42")  # no reasoning at all: the whole text is the answer


def test_format_reward():
    assert format_ok("<think>\nsteps\n</think>\nThe answer is 3.")
    assert format_ok("  <think>x</think> y  ")
    assert not format_ok("The answer is 3.")  # no reasoning
    assert not format_ok("<think>steps</think>")  # no answer after it
    assert not format_ok("<think> </think>The answer is 3.")  # empty reasoning
    assert not format_ok("<think>a</think>b</think>c")  # two end tags
    assert not format_ok("<think>a</think>b<think>c")  # reasoning opened again
    assert not format_ok("<think>never closed")
    v = Verdict(correct=True, formatted=True)
    assert reward(v, 0.1) == pytest.approx(1.1) and reward(Verdict(False, True), 0.1) == pytest.approx(0.1)
    assert reward(Verdict(True, False)) == 1.0


ADD_TESTS = "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"


def test_code_in_the_sandbox_correct_and_wrong():
    good = "<think>add them</think>\n```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "<think>add them</think>\n```python\ndef add(a, b):\n    return a - b\n```"
    assert extract_code(good).strip() == "def add(a, b):\n    return a + b"
    assert code_passes(good, ADD_TESTS, "add")
    assert not code_passes(wrong, ADD_TESTS, "add")
    assert not code_passes("<think>hmm</think>", ADD_TESTS, "add")  # no code at all
    loops = "<think>x</think>```python\ndef add(a, b):\n    while True:\n        pass\n```"
    assert not code_passes(loops, ADD_TESTS, "add", timeout_s=1.0)  # killed by the sandbox's clock
    problem = Problem("p", "Write add(a, b).", tests=ADD_TESTS, entry_point="add")
    assert verify(problem, good) == Verdict(correct=True, formatted=True)
    assert verify(problem, wrong).correct is False


def test_overlong_shaping_values():
    # DAPO: max 20, buffer 4 → no penalty up to 16, then -(len-16)/4, -1 at and past the cap
    assert [overlong_penalty(n, 20, 4) for n in (10, 16, 17, 18, 19, 20, 25)] == [0, 0, -0.25, -0.5, -0.75, -1, -1]
    assert overlong_penalty(18, 20, 4, factor=2.0) == -1.0
    assert overlong_penalty(20, 20, 0) == 0.0  # buffer 0: off


def test_problem_files(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is 2+2?", "answer": "2 + 2 = 4\n#### 4"},  # GSM8K
        {"id": "x7", "question": "Seven?", "answer": 7},  # plain number
        {"prompt": "Write add.", "tests": ADD_TESTS, "entry_point": "add"},  # code
    ]) + "\n")
    a, b, c = load_problems(path)
    assert (a.id, a.answer) == ("p-1", "4") and (b.id, b.answer) == ("x7", "7")
    assert c.tests == ADD_TESTS and c.entry_point == "add" and c.answer is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": "q2"}\n')
    with pytest.raises(ProblemFileError, match=r"bad.jsonl:2: field 'answer'"):
        load_problems(bad)
    bad.write_text('{"question": "q", "answer": "1"}\nnot json\n')
    with pytest.raises(ProblemFileError, match=r"bad.jsonl:2: not valid JSON"):
        load_problems(bad)
    with pytest.raises(ProblemFileError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")


def test_embedded_problems_are_training_side():
    from hemat.data.synthetic import problem_split, train_problems

    problems = embedded_problems(50, seed=3)
    assert len(problems) == 50 and all(problem_split(p.question) == "train" for p in problems)
    assert all(p.answer.lstrip("-").isdigit() for p in problems)
    # a list of levels shares the pool: level 1 listed twice gets two thirds of it
    mixed = embedded_problems(30, seed=3, difficulty=[1, 1, 2])
    levels = {p.question: p.difficulty for level in (1, 2) for p in train_problems(20, 3 + 1000 * level, level)}
    assert len({p.id for p in mixed}) == 30 and [levels[p.question] for p in mixed] == [1, 1, 2] * 10
