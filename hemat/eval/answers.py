"""Final answers of math problems: pull one out of a model's text, and decide whether it equals the
reference. Shared by the math evals and the GRPO rewards.

Matching, in order: equal strings after normalising; equal numbers ("1,234" = "1234", "3.50" = "3.5",
"1/2" = "0.5", "\\frac{1}{2}" = "0.5"; exact for integers and fractions, a relative tolerance once a
decimal point is involved); equal expressions by sympy ("x+x" = "2*x"). The sympy step only sees short
strings made of digits, operators, single-letter variables and a few known functions, parsed with an
empty set of builtins, and it refuses powers that could take long to expand, so nothing a model writes
can run code or hang the check; anything sympy cannot decide is "not equal"."""

from __future__ import annotations

import math
import re
from fractions import Fraction

FLOAT_REL_TOL = 1e-6  # decimals print rounded: 0.1 + 0.2 = 0.30000000000000004 still matches 0.3
MAX_SYMBOLIC_CHARS = 100  # longer strings are compared as text and numbers only
MAX_EXPONENT = 64  # |n| in (x+1)**n; larger powers of expressions are refused rather than expanded
MAX_NUMBER_EXPONENT = 1000  # |n| in 7**n: big integers are quick, but 9**9**9 is not

_NUM = r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_ANSWER_IS = re.compile(rf"answer is\s*:?\s*\$?\s*({_NUM})", re.IGNORECASE)
_HASHES = re.compile(rf"####\s*\$?\s*({_NUM})")
_LAST_NUMBER = re.compile(rf"({_NUM})")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_answer(text: str) -> str | None:
    """The final answer a model wrote: the last "The answer is N", else the last "#### N", else the last
    \\boxed{...} (any expression), else the last number in the text. None when there is none."""
    for pattern in (_ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            return found[-1]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    found = _LAST_NUMBER.findall(text)
    return found[-1] if found else None


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, nested braces included; None if absent or unclosed."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether a predicted final answer equals the reference (see the module docstring)."""
    if predicted is None:
        return False
    pred, ref = _normalize(predicted), _normalize(reference)
    if not pred or not ref:
        return False
    if pred.lower() == ref.lower():
        return True
    a, b = parse_number(pred), parse_number(ref)
    if a is not None and b is not None:
        return _numbers_equal(a, b, exact="." not in pred + ref)
    return _symbolic_equal(pred, ref)


def parse_number(text: str) -> Fraction | None:
    """A plain number: "-1,234", "3.50", "7/8", "\\frac{7}{8}", "25%" (read as 25), "$5". None otherwise."""
    text = re.sub(r"[\s()]", "", _normalize(text)).rstrip("%")
    match = re.fullmatch(r"([-+]?(?:\d{1,3}(?:,\d{3})+|\d+|\d*\.\d+|\d+\.\d*))(?:/(\d+))?", text)
    if not match:
        return None
    value = Fraction(match.group(1).replace(",", ""))
    if match.group(2) is not None:
        if int(match.group(2)) == 0 or "." in match.group(1):
            return None
        value /= int(match.group(2))
    return value


def _numbers_equal(a: Fraction, b: Fraction, exact: bool) -> bool:
    if a == b:
        return True
    return not exact and math.isclose(float(a), float(b), rel_tol=FLOAT_REL_TOL, abs_tol=1e-12)


_LATEX_SIMPLE = [
    (r"\left", ""), (r"\right", ""), (r"\!", ""), (r"\,", ""), (r"\;", ""), (r"\quad", " "),
    (r"\dfrac", r"\frac"), (r"\tfrac", r"\frac"), (r"\cdot", "*"), (r"\times", "*"), (r"\div", "/"),
    (r"\pi", "pi"), ("$", ""),
]


def _normalize(text: str) -> str:
    """Strip the wrapping a model puts around an answer: $...$, \\boxed{}, \\text{}, a final period,
    and turn simple LaTeX (\\frac{a}{b}, \\sqrt{x}, ^{n}) into plain notation."""
    text = text.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    for old, new in _LATEX_SIMPLE:
        text = text.replace(old, new)
    text = re.sub(r"\\(?:text|mathrm|mbox|textbf)\s*\{([^{}]*)\}", r"\1", text)
    previous = None
    while previous != text:  # innermost first, so nested fractions unwind
        previous = text
        text = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", text)
        text = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", text)
    text = text.replace("{", "(").replace("}", ")")
    return text.strip().rstrip(".").strip()


# ---- sympy ----------------------------------------------------------------------------------------------

_FUNCTIONS = ("sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi")
_SAFE_CHARS = re.compile(r"[0-9A-Za-z+\-*/^(). ]*")


def _symbolic_equal(a: str, b: str) -> bool:
    try:
        x, y = _parse_expression(a), _parse_expression(b)
        if x is None or y is None:
            return False
        import sympy

        difference = sympy.simplify(x - y)
        if difference == 0:
            return True
        if difference.is_number and not difference.free_symbols:
            value = complex(difference.evalf())
            scale = max(abs(complex(x.evalf())), abs(complex(y.evalf())), 1e-12)
            return abs(value) <= FLOAT_REL_TOL * scale
        return False
    except Exception:  # sympy raises many kinds of errors on odd input; any of them means "cannot decide"
        return False


def _parse_expression(text: str):
    """A sympy expression from a sanitised string, or None when the string is not a safe expression."""
    text = text.replace("**", "^")
    if len(text) > MAX_SYMBOLIC_CHARS or not _SAFE_CHARS.fullmatch(text):
        return None
    if re.search(r"(?<!\d)\.|\.(?!\d)", text):  # a dot outside a number would be attribute access
        return None
    if any(len(name) > 1 and name not in _FUNCTIONS for name in re.findall(r"[A-Za-z]+", text)):
        return None  # words are not math: only single-letter variables and the known functions
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor, implicit_multiplication, parse_expr, standard_transformations,
    )

    names = {"sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "log": sympy.log,
             "ln": sympy.log, "exp": sympy.exp, "pi": sympy.pi}
    # what the parser's generated code calls; no __builtins__, so the code can reach nothing else
    global_dict = {"__builtins__": {}, "Integer": sympy.Integer, "Float": sympy.Float,
                   "Rational": sympy.Rational, "Symbol": sympy.Symbol, "Function": sympy.Function,
                   "Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow}
    transformations = standard_transformations + (implicit_multiplication, convert_xor)

    def parse(evaluate: bool):
        return parse_expr(text, local_dict=dict(names), global_dict=dict(global_dict),
                          transformations=transformations, evaluate=evaluate)

    unevaluated = parse(evaluate=False)
    for node in sympy.preorder_traversal(unevaluated):
        if isinstance(node, sympy.Pow) and not _small_power(node.base, node.exp):
            return None
    return parse(evaluate=True)


def _small_power(base, exponent) -> bool:
    """A power is safe to evaluate when its exponent is symbolic or a modest number: 9^9^9 is not."""
    if exponent.free_symbols:
        return True
    limit = MAX_NUMBER_EXPONENT if base.is_Number else MAX_EXPONENT
    return exponent.is_Number and abs(exponent) <= limit
