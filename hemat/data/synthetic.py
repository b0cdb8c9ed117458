"""The embedded default corpus: a deterministic generator of English arithmetic word problems with
worked, step-by-step solutions and an integer answer. Nothing is downloaded.

Problems are short on purpose (questions under ~40 words, 1-4 steps that each show their arithmetic,
"3 * 4 = 12"), so that a model of a few million parameters can learn them on a CPU in minutes.
Difficulty 1-3 sets the number of steps and the size of the numbers. Train and eval are split by a
hash of the question text, so no eval question ever appears, word for word, in the training data."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from hemat.errors import HematError

LEVELS = (1, 2, 3)
EVAL_BUCKETS = 10  # one question hash in ten is held out for evaluation


@dataclass
class Problem:
    id: str
    question: str
    steps: list[str]
    answer: int
    difficulty: int
    template: str


NAMES = ["Maya", "Leo", "Ana", "Sam", "Nora", "Omar", "Lily", "Ben", "Zoe", "Ravi",
         "Ivy", "Max", "Emma", "Jack", "Mia", "Noah", "Ella", "Liam", "Aria", "Kai"]
GOODS = ["pencils", "notebooks", "apples", "books", "cups", "toys", "stickers", "pens",
         "oranges", "candles", "plates", "balls"]
THINGS = ["cookies", "marbles", "stickers", "cards", "candies", "shells", "beads", "grapes"]
VEHICLES = [("car", "km"), ("train", "km"), ("bus", "km"), ("cyclist", "miles"), ("truck", "miles")]
SALE_ITEMS = ["jacket", "lamp", "bike", "chair", "watch", "bag", "game", "kettle"]
STOCK = [("library", "books"), ("shop", "hats"), ("farm", "eggs"), ("bakery", "rolls"), ("store", "boxes")]
PERCENTS = [10, 20, 25, 30, 40, 50, 60, 75]

Template = Callable[[random.Random, int], tuple[str, list[str], int]]


def _top(level: int, small: int, medium: int, large: int) -> int:
    return (small, medium, large)[level - 1]


def _shopping(rng: random.Random, level: int) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    item1, item2 = rng.sample(GOODS, 2)
    a, p = rng.randint(2, _top(level, 9, 12, 20)), rng.randint(2, _top(level, 9, 15, 25))
    c1 = a * p
    question = f"{name} buys {a} {item1} at ${p} each."
    steps = [f"The {item1} cost {a} * {p} = {c1} dollars."]
    if level == 1:
        return f"{question} How many dollars does {name} spend?", steps, c1
    b, q = rng.randint(2, _top(level, 9, 12, 20)), rng.randint(2, _top(level, 9, 15, 25))
    c2 = b * q
    total = c1 + c2
    question += f" {name} also buys {b} {item2} at ${q} each."
    steps += [f"The {item2} cost {b} * {q} = {c2} dollars.", f"In total {c1} + {c2} = {total} dollars."]
    if level == 2:
        return f"{question} How many dollars does {name} spend in total?", steps, total
    bill = next(v for v in (50, 100, 200, 500, 1000, 2000) if v > total)
    steps.append(f"The change is {bill} - {total} = {bill - total} dollars.")
    question += f" {name} pays with a ${bill} bill. How many dollars of change does {name} get?"
    return question, steps, bill - total


def _sharing(rng: random.Random, level: int) -> tuple[str, list[str], int]:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    if level == 1:
        k, each = rng.randint(2, 9), rng.randint(2, 9)
        total = k * each
        question = f"{name} has {total} {things} and shares them equally among {k} friends."
        return (f"{question} How many {things} does each friend get?",
                [f"Each friend gets {total} / {k} = {each} {things}."], each)
    bags, per = rng.randint(2, _top(level, 9, 9, 15)), rng.randint(3, _top(level, 9, 12, 20))
    total = bags * per
    steps = [f"There are {bags} * {per} = {total} {things}."]
    if level == 2:
        k = rng.choice([d for d in range(2, 13) if total % d == 0 and d < total])
        steps.append(f"Each friend gets {total} / {k} = {total // k} {things}.")
        question = f"{name} has {bags} bags with {per} {things} in each and shares them equally among {k} friends."
        return f"{question} How many {things} does each friend get?", steps, total // k
    k = rng.randint(2, min(9, total // 2))
    eaten = total % k or k  # leaves a multiple of k, and at least half of the total
    rest = total - eaten
    steps += [f"After eating {eaten}, {total} - {eaten} = {rest} are left.",
              f"Each friend gets {rest} / {k} = {rest // k}."]
    question = (f"{name} has {bags} bags with {per} {things} in each, eats {eaten}, "
                f"and shares the rest equally among {k} friends.")
    return f"{question} How many {things} does each friend get?", steps, rest // k


def _travel(rng: random.Random, level: int) -> tuple[str, list[str], int]:
    vehicle, unit = rng.choice(VEHICLES)
    s1, h1 = rng.randint(2, _top(level, 9, 12, 20)) * 5, rng.randint(2, _top(level, 5, 6, 8))
    d1 = s1 * h1
    if level == 1:
        return (f"A {vehicle} travels at {s1} {unit} per hour for {h1} hours. How many {unit} does it travel?",
                [f"It travels {s1} * {h1} = {d1} {unit}."], d1)
    s2, h2 = rng.randint(2, _top(level, 9, 12, 20)) * 5, rng.randint(2, _top(level, 5, 6, 8))
    d2 = s2 * h2
    if level == 2:
        question = (f"A {vehicle} travels at {s1} {unit} per hour for {h1} hours, then at {s2} {unit} per hour "
                    f"for {h2} hours. How many {unit} does it travel in total?")
        steps = [f"First it travels {s1} * {h1} = {d1} {unit}.", f"Then it travels {s2} * {h2} = {d2} {unit}.",
                 f"In total {d1} + {d2} = {d1 + d2} {unit}."]
        return question, steps, d1 + d2
    trip = d1 + d2
    question = (f"A {vehicle} must travel {trip} {unit}. It goes at {s1} {unit} per hour for {h1} hours, then at "
                f"{s2} {unit} per hour. How many more hours does it need?")
    steps = [f"First it travels {s1} * {h1} = {d1} {unit}.", f"It still has {trip} - {d1} = {d2} {unit} to go.",
             f"That takes {d2} / {s2} = {h2} hours."]
    return question, steps, h2


def _ages(rng: random.Random, level: int) -> tuple[str, list[str], int]:
    a, b, c = rng.sample(NAMES, 3)
    x, m = rng.randint(2, _top(level, 12, 15, 20)), rng.randint(2, _top(level, 4, 4, 5))
    older = x * m
    question = f"{a} is {x} years old. {b} is {m} times as old as {a}."
    steps = [f"{b} is {x} * {m} = {older} years old."]
    if level == 1:
        return f"{question} How old is {b}?", steps, older
    if level == 2:
        k = rng.randint(2, 15)
        steps.append(f"In {k} years {b} will be {older} + {k} = {older + k}.")
        return f"{question} How old will {b} be in {k} years?", steps, older + k
    d = rng.randint(1, older - 1)
    third = older - d
    total = x + older + third
    steps += [f"{c} is {older} - {d} = {third} years old.", f"Together {x} + {older} + {third} = {total} years."]
    return f"{question} {c} is {d} years younger than {b}. What is the sum of their three ages?", steps, total


def _geometry(rng: random.Random, level: int) -> tuple[str, list[str], int]:
    w, h = rng.randint(3, _top(level, 12, 20, 40)), rng.randint(2, _top(level, 9, 15, 30))
    if level == 1:
        if rng.random() < 0.5:
            return (f"A rectangle is {w} meters long and {h} meters wide. What is its area in square meters?",
                    [f"The area is {w} * {h} = {w * h} square meters."], w * h)
        return (f"A square has sides of {w} cm. What is its perimeter in cm?",
                [f"The perimeter is 4 * {w} = {4 * w} cm."], 4 * w)
    half = w + h
    steps = [f"Length plus width is {w} + {h} = {half} meters.", f"The perimeter is 2 * {half} = {2 * half} meters."]
    question = f"A garden is {w} meters long and {h} meters wide."
    if level == 2:
        return f"{question} What is its perimeter in meters?", steps, 2 * half
    if rng.random() < 0.5:
        price = rng.randint(2, 9)
        steps.append(f"The fence costs {2 * half} * {price} = {2 * half * price} dollars.")
        return (f"{question} A fence around it costs ${price} per meter. How many dollars does the fence cost?",
                steps, 2 * half * price)
    rw, rh = rng.randint(1, w - 1), rng.randint(1, h - 1)
    area, rug = w * h, rw * rh
    steps = [f"The room is {w} * {h} = {area} square meters.", f"The rug is {rw} * {rh} = {rug} square meters.",
             f"Uncovered: {area} - {rug} = {area - rug} square meters."]
    question = (f"A room is {w} meters long and {h} meters wide. A rug is {rw} meters long and {rh} meters wide. "
                f"How many square meters of floor are not covered?")
    return question, steps, area - rug


def _percent(rng: random.Random, level: int) -> tuple[str, list[str], int]:
    pct = rng.choice(PERCENTS)
    unit = 100 // math.gcd(pct, 100)  # price multiples that make pct% a whole number
    price = unit * rng.randint(1, _top(level, 10, 20, 40))
    if price < 10:
        price *= 10
    off = price * pct // 100
    steps = [f"{pct}% of {price} is {price} * {pct} / 100 = {off}."]
    if level == 1:
        question = f"A class has {price} students. {pct}% of them walk to school. How many students walk to school?"
        return question, steps, off
    item = rng.choice(SALE_ITEMS)
    sale = price - off
    steps.append(f"The sale price is {price} - {off} = {sale} dollars.")
    question = f"A {item} costs ${price}. It is on sale for {pct}% off."
    if level == 2:
        return f"{question} What is the sale price in dollars?", steps, sale
    name, k = rng.choice(NAMES), rng.randint(2, 6)
    steps.append(f"{k} of them cost {k} * {sale} = {k * sale} dollars.")
    return f"{question} {name} buys {k} of them. How many dollars does {name} pay?", steps, k * sale


def _stock(rng: random.Random, level: int) -> tuple[str, list[str], int]:
    place, goods = rng.choice(STOCK)
    if level == 1:
        have = rng.randint(10, 99)
        gone = rng.randint(1, have - 1)
        return (f"A {place} has {have} {goods}. It sells {gone} of them. How many {goods} are left?",
                [f"There are {have} - {gone} = {have - gone} {goods} left."], have - gone)
    rows, per = rng.randint(2, _top(level, 9, 9, 15)), rng.randint(2, _top(level, 9, 12, 20))
    have, extra = rows * per, rng.randint(2, _top(level, 9, 20, 50))
    steps = [f"It has {rows} * {per} = {have} {goods}.",
             f"After the delivery it has {have} + {extra} = {have + extra}."]
    question = f"A {place} has {rows} shelves with {per} {goods} on each. It gets {extra} more {goods}."
    if level == 2:
        return f"{question} How many {goods} does it have now?", steps, have + extra
    sold = rng.randint(1, have + extra - 1)
    left = have + extra - sold
    steps.append(f"After selling {sold}, {have + extra} - {sold} = {left} are left.")
    return f"{question} Then it sells {sold} {goods}. How many {goods} are left?", steps, left


def _earnings(rng: random.Random, level: int) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    wage, hours = rng.randint(5, _top(level, 12, 20, 30)), rng.randint(2, _top(level, 9, 8, 8))
    pay = wage * hours
    if level == 1:
        return (f"{name} earns ${wage} per hour and works {hours} hours. How many dollars does {name} earn?",
                [f"{name} earns {wage} * {hours} = {pay} dollars."], pay)
    if level == 2:
        spent = rng.randint(1, pay - 1)
        question = (f"{name} earns ${wage} per hour and works {hours} hours. Then {name} spends ${spent}. "
                    f"How many dollars are left?")
        return question, [f"{name} earns {wage} * {hours} = {pay} dollars.",
                          f"{pay} - {spent} = {pay - spent} dollars are left."], pay - spent
    days = rng.randint(2, 7)
    total = pay * days
    spent = rng.randint(1, total - 1)
    question = (f"{name} earns ${wage} per hour, works {hours} hours a day for {days} days, and spends ${spent}. "
                f"How many dollars are left?")
    steps = [f"Each day {name} earns {wage} * {hours} = {pay} dollars.",
             f"Over {days} days that is {pay} * {days} = {total}.",
             f"{total} - {spent} = {total - spent} dollars are left."]
    return question, steps, total - spent


TEMPLATES: dict[str, Template] = {
    "shopping": _shopping,
    "sharing": _sharing,
    "travel": _travel,
    "ages": _ages,
    "geometry": _geometry,
    "percent": _percent,
    "stock": _stock,
    "earnings": _earnings,
}


def _question_hash(question: str) -> int:
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")


def problem_split(question: str) -> str:
    """'eval' for one question in EVAL_BUCKETS (by a hash of its text), else 'train'."""
    return "eval" if _question_hash(question) % EVAL_BUCKETS == 0 else "train"


def _stream(seed: int, difficulty: int | None) -> Iterator[Problem]:
    if difficulty is not None and difficulty not in LEVELS:
        raise HematError(f"difficulty must be one of {LEVELS} or None, got {difficulty!r}")
    names = list(TEMPLATES)
    i = 0
    while True:
        rng = random.Random(f"hemat-synthetic:{seed}:{i}")  # per-problem rng: prefixes are stable
        level = difficulty or rng.choice(LEVELS)
        template = rng.choice(names)
        question, steps, answer = TEMPLATES[template](rng, level)
        yield Problem(f"{_question_hash(question):016x}", question, steps, answer, level, template)
        i += 1


def generate_problems(n: int, seed: int = 0, difficulty: int | None = None, split: str | None = None) -> list[Problem]:
    """n distinct problems (by question text), deterministic in (seed, difficulty); split 'train' or 'eval'
    keeps only that side of the hash split. difficulty None mixes levels 1-3."""
    if split not in (None, "train", "eval"):
        raise HematError(f"split must be 'train', 'eval' or None, got {split!r}")
    problems: list[Problem] = []
    seen: set[str] = set()
    max_draws = 50 * n + 1000  # the level-1 space is finite: fail loudly instead of looping forever
    for draws, p in enumerate(_stream(seed, difficulty)):
        if len(problems) == n:
            break
        if draws >= max_draws:
            raise HematError(f"could only generate {len(problems)} distinct {split or ''} problems of difficulty "
                             f"{difficulty} (asked for {n}); lower n or widen the difficulty")
        if p.question in seen or (split and problem_split(p.question) != split):
            continue
        seen.add(p.question)
        problems.append(p)
    return problems


def train_problems(n: int, seed: int = 0, difficulty: int | None = None) -> list[Problem]:
    return generate_problems(n, seed, difficulty, split="train")


def eval_problems(n: int = 200, seed: int = 0, difficulty: int | None = None) -> list[Problem]:
    return generate_problems(n, seed, difficulty, split="eval")


# ---- formats used by the later stages ---------------------------------------------------------

def format_prompt(question: str) -> str:
    """The prompt a base (pretrained-only) model completes; format_pretrain_document continues it."""
    return f"Question: {question}\nSolution:"


def format_answer(answer: int) -> str:
    return f"The answer is {answer}."


def format_pretrain_document(problem: Problem) -> str:
    return f"{format_prompt(problem.question)} {' '.join(problem.steps)} {format_answer(problem.answer)}"


def format_chat(problem: Problem) -> dict:
    return {"messages": [
        {"role": "user", "content": problem.question},
        {"role": "assistant", "reasoning_content": "\n".join(problem.steps), "content": format_answer(problem.answer)},
    ]}


_NUM = r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_ANSWER_PATTERNS = [
    re.compile(rf"answer is\s*:?\s*\$?\s*({_NUM})", re.IGNORECASE),
    re.compile(rf"####\s*\$?\s*({_NUM})"),
    re.compile(rf"\\boxed\{{\s*\$?\s*({_NUM})\s*\}}"),
    re.compile(rf"({_NUM})"),  # fallback: the last number in the text
]


def extract_answer(text: str) -> int | None:
    """A model's final integer answer: the last "The answer is N", else "#### N", else \\boxed{N}, else the
    last number. None when there is none, or when it is not a whole number."""
    for pattern in _ANSWER_PATTERNS:
        found = pattern.findall(text)
        if found:
            value = float(found[-1].replace(",", ""))
            return int(value) if value.is_integer() else None
    return None


# ---- corpus files for `hemat data prepare` ----------------------------------------------------

_SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def stdlib_sources(max_bytes: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    """(relative path, source) of the Python standard library's own .py files, in a seeded order, at
    most max_bytes of UTF-8 in total (files that do not fit the remaining budget are skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_STDLIB_DIRS & set(p.relative_to(root).parts[:-1]))
    random.Random(f"hemat-stdlib:{seed}").shuffle(files)
    budget = max_bytes
    for path in files:
        size = path.stat().st_size
        if size == 0 or size > budget:
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        budget -= size
        yield str(path.relative_to(root)), source


def write_corpus(out_dir: str | Path, n_problems: int, seed: int = 0, include_stdlib_code: bool = False,
                 stdlib_max_bytes: int = 2_000_000) -> list[Path]:
    """Write the embedded pretraining corpus as JSONL files with a `text` field: arithmetic.jsonl
    (training-side problems only, never eval ones) and, optionally, python_stdlib.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems_path = out / "arithmetic.jsonl"
    with problems_path.open("w", encoding="utf-8") as f:
        for p in train_problems(n_problems, seed):
            record = {"text": format_pretrain_document(p), **asdict(p)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    paths = [problems_path]
    if include_stdlib_code:
        code_path = out / "python_stdlib.jsonl"
        with code_path.open("w", encoding="utf-8") as f:
            for rel, source in stdlib_sources(stdlib_max_bytes, seed):
                f.write(json.dumps({"text": source, "path": rel}, ensure_ascii=False) + "\n")
        paths.append(code_path)
    return paths
