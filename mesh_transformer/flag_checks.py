"""Ranges of the command-line flags, checked right after parsing (before any file is read or model built).

argparse checks types; a `--n_train_samples -1` (a Python slice: 9,999 questions), `--temperature nan` or
`--eval_seq 0` used to pass and do something else than asked. Each CLI lists its numeric flags with their range:

    check(args, {"--temperature": at_least(0), "--n_samples": at_least(1), "--p_rationalization": share()}, tool)

and a value outside raises FlagError: `--temperature nan: must be a finite number >= 0 (iteration_train.py)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence


class FlagError(ValueError):
    """A flag value outside its range; the message names the flag, the value and the range."""


@dataclasses.dataclass(frozen=True)
class Range:
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False  # lo itself is not allowed
    also: Sequence[Any] = ()  # special values allowed besides the range (e.g. -1 = "latest")
    integer: bool = False

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"<= {self.hi:g}")
        text = ("an integer " if self.integer else "a finite number ") + " and ".join(parts)
        if self.also:
            text += f" (or {', '.join(map(str, self.also))})"
        return text.strip()

    def ok(self, value: Any) -> bool:
        if value in self.also:
            return True
        try:
            x = float(value)
        except (TypeError, ValueError):
            return False
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or x <= self.hi


def at_least(lo: float, also: Sequence[Any] = ()) -> Range:
    return Range(lo=lo, also=tuple(also))


def positive() -> Range:
    return Range(lo=0, lo_open=True)


def share() -> Range:
    """A probability / fraction in [0, 1]."""
    return Range(lo=0, hi=1)


def finite() -> Range:
    return Range()


def check(args: Any, rules: Mapping[str, Range], tool: str) -> None:
    """Raises FlagError for the first flag of `rules` (as the user types it, e.g. "--out-dir") whose value in the
    parsed `args` lies outside its range. None (flag not given, no default) is not checked."""
    for flag, rule in rules.items():
        dest = flag.lstrip("-").replace("-", "_")
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None:
            continue
        if not rule.ok(value):
            raise FlagError(f"{flag} {value}: must be {rule.describe()} ({tool}); see `python {tool} --help`")
