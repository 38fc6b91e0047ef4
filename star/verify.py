"""Rationale checking: is every intermediate step of a completion right, not just its final answer?

STaR keeps a rationale when its final answer is right; a right answer can still come from wrong steps. Where the steps
can be checked mechanically we do:

- arithmetic: every scratchpad line is recomputed from the problem (`star.tasks.arithmetic.scratchpad_lines`) and
  compared; the first difference is reported as a wrong digit pair, wrong result digits, wrong carry, a missing or an
  extra line, a missing `</scratch>` / answer line, or an answer line that disagrees with the scratchpad.
- GSM8K: every `<<expr=value>>` calculator annotation is evaluated (a safe `ast` evaluator: numbers with decimals and
  thousands commas, + - * / // **, unary signs, parentheses) and compared with its value (relative tolerance 1e-6).
- CommonsenseQA: nothing to check (`verify` gives None).

Each `check_*` returns `Check(ok, first_bad_line, reason)`, `first_bad_line` counting the completion's lines from 1.
"""
from __future__ import annotations

import ast
import math
import operator
import re
from typing import NamedTuple

from star.tasks import EOT, Example, canonical_name
from star.tasks.arithmetic import operands, scratchpad_lines


class Check(NamedTuple):
    ok: bool
    first_bad_line: int | None
    reason: str


_OK = Check(True, None, "ok")


# -- arithmetic ------------------------------------------------------------------------------------------------------
_STEP = re.compile(r"^(?P<head>.*?)\s*,\s*(?P<digits>(?:\d\s*)*?)\s*C:\s*(?P<carry>\S*)$")


def _norm(line: str) -> str:
    return " ".join(line.split())


def _diagnose(got: str, want: str) -> str:
    """Why a scratchpad line differs from the recomputed one."""
    g, w = _STEP.match(got), _STEP.match(want)
    if w is None:                              # the carry + sum line
        return f"wrong sum line {got!r} (expected {want!r})"
    if g is None:
        return f"malformed step line {got!r} (expected {want!r})"
    if _norm(g["head"]) != _norm(w["head"]):
        return f"wrong digit pair {g['head']!r} (expected {w['head']!r})"
    if _norm(g["digits"]) != _norm(w["digits"]):
        return f"wrong result digits {_norm(g['digits'])!r} (expected {_norm(w['digits'])!r})"
    return f"wrong carry C: {g['carry']} (expected C: {w['carry']})"


def check_arithmetic(question_or_ex: Example | str, completion: str) -> Check:
    """Recompute the scratchpad of the problem and compare the completion with it line by line."""
    if isinstance(question_or_ex, Example):
        meta = question_or_ex.meta
        a, b = (meta["a"], meta["b"]) if "a" in meta and "b" in meta else operands(question_or_ex.question)
    else:
        a, b = operands(question_or_ex)
    want = scratchpad_lines(a, b)              # <scratch>, steps..., sum line, </scratch>, answer
    body_want = want[1:-2]
    lines = [_norm(line) for line in completion.split(EOT)[0].split("\n\n")[0].split("\n")]
    if not lines or lines[0] != "<scratch>":
        return Check(False, 1, f"completion does not start with <scratch> (got {lines[0]!r})")
    end = next((i for i, line in enumerate(lines) if line == "</scratch>"), None)
    body = lines[1:end] if end is not None else [line for line in lines[1:] if line]
    for i in range(max(len(body), len(body_want))):
        lineno = i + 2
        if i >= len(body):
            return Check(False, lineno, f"missing line {body_want[i]!r}")
        if i >= len(body_want):
            return Check(False, lineno, "missing </scratch>" if end is None else f"extra line {body[i]!r}")
        if body[i] != body_want[i]:
            if i + 1 < len(body_want) and body[i] == body_want[i + 1]:
                return Check(False, lineno, f"missing line {body_want[i]!r}")
            if i + 1 < len(body) and body[i + 1] == body_want[i]:
                return Check(False, lineno, f"extra line {body[i]!r}")
            return Check(False, lineno, _diagnose(body[i], body_want[i]))
    if end is None:
        return Check(False, len(body) + 2, "missing </scratch>")
    if end + 1 >= len(lines) or not lines[end + 1]:
        return Check(False, end + 2, "missing answer line after </scratch>")
    if lines[end + 1] != want[-1]:
        return Check(False, end + 2, f"answer {lines[end + 1]!r} does not match the scratchpad (sum {want[-1]!r})")
    return _OK


# -- GSM8K -----------------------------------------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_ANNOTATION = re.compile(r"<<(.*?)>>")


def safe_eval(expr: str) -> float:
    """Value of an arithmetic expression: numbers (decimals, `1,000`, `$`), + - * / // **, unary signs, parentheses.
    Anything else (names, calls, %, ...) raises ValueError."""
    text = expr.replace("$", "").strip()
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)     # thousands separators
    text = re.sub(r"(?<![\d.])0+(?=\d)", "", text)           # 007 -> 7 (a SyntaxError in Python 3)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from None

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ValueError(f"exponent too large in {expr!r}")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported element {type(node).__name__} in {expr!r}")

    try:
        value = ev(tree)
    except (ZeroDivisionError, OverflowError) as err:
        raise ValueError(f"cannot evaluate {expr!r}: {err}") from None
    if isinstance(value, complex) or not math.isfinite(value):
        raise ValueError(f"{expr!r} has no finite real value")
    return value


def annotations(completion: str) -> list[tuple[int, str]]:
    """(1-based line, text inside << >>) of each calculator annotation."""
    return [(lineno, m.group(1)) for lineno, line in enumerate(completion.split(EOT)[0].split("\n"), 1)
            for m in _ANNOTATION.finditer(line)]


def check_gsm8k(completion: str, rel_tol: float = 1e-6) -> Check:
    """Evaluate every `<<expr=value>>` annotation; the first one whose expression does not give its value fails."""
    for lineno, ann in annotations(completion):
        if "=" not in ann:
            return Check(False, lineno, f"annotation <<{ann}>> has no '='")
        expr, value = ann.rsplit("=", 1)
        try:
            got, claimed = safe_eval(expr), safe_eval(value)
        except ValueError as err:
            return Check(False, lineno, f"annotation <<{ann}>>: {err}")
        if not math.isclose(got, claimed, rel_tol=rel_tol, abs_tol=1e-9):
            return Check(False, lineno, f"annotation <<{ann}>>: {expr.strip()} = {got:g}, not {value.strip()}")
    return _OK


# -- dispatch --------------------------------------------------------------------------------------------------------
def verify(task_name: str, ex: Example, completion: str) -> bool | None:
    """Are the completion's steps right? None where the task (or this completion) has nothing checkable."""
    name = canonical_name(task_name)
    if name == "arithmetic":
        return check_arithmetic(ex, completion).ok
    if name == "gsm8k":
        return check_gsm8k(completion).ok if annotations(completion) else None
    return None


__all__ = ["Check", "check_arithmetic", "check_gsm8k", "safe_eval", "annotations", "verify"]
