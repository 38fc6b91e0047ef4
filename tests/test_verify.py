"""Rationale checking: the checkers pass every correct rationale and flag exactly the corrupted ones."""
import json
import random

import pytest

from star.tasks import Example
from star.tasks.arithmetic import scratchpad, scratchpad_lines
from star.verify import annotations, check_arithmetic, check_gsm8k, safe_eval, verify


def problem(a, b):
    return Example("x", f"{' '.join(str(a))} + {' '.join(str(b))}", " ".join(str(a + b)),
                   {"a": a, "b": b, "digits": len(str(a))})


def edit(a, b, i, new):
    """The reference scratchpad of a + b with line i (0-based, in scratchpad_lines) replaced (new=None: dropped)."""
    lines = scratchpad_lines(a, b)
    lines[i:i + 1] = [] if new is None else [new]
    return "\n".join(lines) + "\n"


# -- arithmetic -------------------------------------------------------------------------------------------------------
def test_correct_scratchpads_pass():
    rng = random.Random(0)
    for k in range(1, 8):
        for _ in range(20):
            a, b = rng.randrange(10 ** (k - 1), 10 ** k), rng.randrange(10 ** (k - 1), 10 ** k)
            ex = problem(a, b)
            assert check_arithmetic(ex, scratchpad(a, b)) == (True, None, "ok")
            question = f"Input:\n{ex.question}\nTarget:\n"
            assert check_arithmetic(question, scratchpad(a, b) + "\nInput:\n1 + 1\n").ok    # the next shot is ignored
            assert verify("arithmetic", ex, scratchpad(a, b)) is True


# 964 + 494: lines 1 <scratch>, 2 `9 6 4 + 4 9 4 , C: 0`, 3 `6 + 9 , 8 C: 0`, 4 `9 + 4 , 5 8 C: 1`,
# 5 `, 4 5 8 C: 1`, 6 `1 4 5 8`, 7 </scratch>, 8 `1 4 5 8`
CORRUPTIONS = [
    ("changed result digit", edit(964, 494, 3, "9 + 4 , 5 9 C: 1"), 4, "wrong result digits"),
    ("wrong carry", edit(964, 494, 2, "6 + 9 , 8 C: 1"), 3, "wrong carry"),
    ("wrong digit pair", edit(964, 494, 2, "6 + 8 , 8 C: 0"), 3, "wrong digit pair"),
    ("changed problem line", edit(964, 494, 1, "9 6 4 + 4 9 5 , C: 0"), 2, "wrong digit pair"),
    ("dropped step line", edit(964, 494, 3, None), 4, "missing line"),
    ("dropped last step", edit(964, 494, 4, None), 5, "missing line"),
    ("duplicated line", edit(964, 494, 2, "6 + 9 , 8 C: 0\n6 + 9 , 8 C: 0"), 4, "extra line"),
    ("wrong sum line", edit(964, 494, 5, "1 4 5 9"), 6, "wrong sum line"),
    ("answer disagrees with scratchpad", edit(964, 494, 7, "1 4 5 9"), 8, "does not match the scratchpad"),
    ("missing answer", edit(964, 494, 7, None), 8, "missing answer line"),
    ("missing </scratch>", edit(964, 494, 6, None), 7, "missing </scratch>"),
    ("no scratchpad", "1 4 5 8\n", 1, "does not start with <scratch>"),
    ("malformed step", edit(964, 494, 2, "6 + 9 gives 8"), 3, "malformed step line"),
    # right final answer, wrong steps: two compensating errors (carry dropped, then a digit bumped)
    ("right answer, wrong steps",
     "<scratch>\n9 6 4 + 4 9 4 , C: 0\n6 + 9 , 8 C: 0\n9 + 4 , 5 8 C: 0\n, 4 5 8 C: 1\n1 4 5 8\n</scratch>\n1 4 5 8\n",
     4, "wrong carry"),
]


@pytest.mark.parametrize("label, completion, line, reason", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_scratchpad_flagged(label, completion, line, reason):
    ok, bad_line, why = check_arithmetic(problem(964, 494), completion)
    assert not ok and bad_line == line and reason in why, why


def test_arithmetic_flags_exactly_the_corrupted():
    """A mixed bag: the checker's verdicts equal the corruption labels."""
    rng = random.Random(1)
    cases = []
    for _ in range(60):
        k = rng.randrange(2, 7)
        a, b = rng.randrange(10 ** (k - 1), 10 ** k), rng.randrange(10 ** (k - 1), 10 ** k)
        lines = scratchpad_lines(a, b)
        corrupt = rng.random() < 0.5
        if corrupt:
            i = rng.randrange(1, len(lines) - 2)                   # a step line or the sum line
            kind = rng.choice(["digit", "drop"])
            if kind == "drop":
                del lines[i]
            else:
                pos = rng.choice([j for j, ch in enumerate(lines[i]) if ch.isdigit()])
                lines[i] = lines[i][:pos] + str((int(lines[i][pos]) + rng.randrange(1, 10)) % 10) + lines[i][pos + 1:]
        cases.append((problem(a, b), "\n".join(lines) + "\n", corrupt))
    assert [not check_arithmetic(ex, c).ok for ex, c, _ in cases] == [corrupt for _, _, corrupt in cases]
    assert sum(corrupt for *_, corrupt in cases) > 15


def test_arithmetic_whitespace_tolerant():
    assert check_arithmetic(problem(964, 494), scratchpad(964, 494).replace(" , ", "  ,  ") + "<|endoftext|>").ok


# -- GSM8K -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gsm_solutions(shared_data):
    with open(shared_data / "star" / "gsm" / "train_rand_split.jsonl") as f:
        return [json.loads(next(f))["answer"] for _ in range(200)]


def test_real_gsm_solutions_pass(gsm_solutions):
    checked = 0
    for solution in gsm_solutions:
        assert check_gsm8k(solution) == (True, None, "ok"), solution
        checked += len(annotations(solution))
    assert checked > 400


def _corrupt(solution: str, rng: random.Random) -> str:
    """Change one digit of the value of one annotation; returns the text and the line of the change."""
    _, ann = rng.choice(annotations(solution))
    lineno = next(i for i, line in enumerate(solution.split("\n"), 1) if f"<<{ann}>>" in line)
    expr, value = ann.rsplit("=", 1)
    j = rng.choice([j for j, ch in enumerate(value) if ch.isdigit()])
    new_value = value[:j] + str((int(value[j]) + 1) % 10) + value[j + 1:]
    return solution.replace(f"<<{ann}>>", f"<<{expr}={new_value}>>", 1), lineno


def test_gsm_flags_exactly_the_corrupted(gsm_solutions):
    rng = random.Random(0)
    cases = []
    for solution in gsm_solutions[:120]:
        if not annotations(solution):
            continue
        if rng.random() < 0.5:
            corrupted, lineno = _corrupt(solution, rng)
            cases.append((corrupted, True, lineno))
        else:
            cases.append((solution, False, None))
    results = [check_gsm8k(c) for c, _, _ in cases]
    assert [not r.ok for r in results] == [corrupt for _, corrupt, _ in cases]
    assert [r.first_bad_line for r in results] == [line for *_, line in cases]
    assert sum(corrupt for _, corrupt, _ in cases) > 30


def test_gsm_right_answer_wrong_steps():
    # Natalia (the first exemplar): the final answer is right but the first step is wrong
    completion = (" Natalia sold 48/2 = <<48/2=25>>25 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    ok, line, reason = check_gsm8k(completion)
    assert not ok and line == 1 and "48/2 = 24, not 25" in reason
    assert verify("gsm8k", Example("x", "q", "72", {}), completion) is False
    assert verify("gsm", Example("x", "q", "72", {}), completion.replace("=25>>", "=24>>")) is True


@pytest.mark.parametrize("annotation, ok", [
    ("<<1,000*2=2,000>>", True),
    ("<<1,250,000/2=625,000>>", True),
    ("<<18*.5=9.00>>", True),
    ("<<+30+46+38+11+18=143>>", True),
    ("<<(3+4)*2**3=56>>", True),
    ("<<560//10=56>>", True),
    ("<<-5+2=-3>>", True),
    ("<<$5*3=15>>", True),
    ("<<1/3=0.333333>>", True),          # within 1e-6 relative
    ("<<1/3=0.33>>", False),
    ("<<2*08=16>>", True),               # a leading zero is not a syntax error here
    ("<<0.05*100=5>>", True),
    ("<<5/0=1>>", False),
    ("<<2**100000=1>>", False),
    ("<<__import__('os').getcwd()=1>>", False),
    ("<<x*2=4>>", False),
    ("<<3+4>>", False),
])
def test_gsm_annotation_evaluation(annotation, ok):
    assert check_gsm8k(f"Some text {annotation} more.\n#### 1").ok is ok


def test_safe_eval():
    assert safe_eval("2*(3+4)") == 14 and safe_eval("1,234+1") == 1235 and safe_eval("7/2") == 3.5
    for bad in ["len('a')", "a", "2 if 1 else 3", "[1]", "1;2", "3 % 2", "(1, 2)"]:
        with pytest.raises(ValueError):
            safe_eval(bad)


# -- dispatch ------------------------------------------------------------------------------------------------------------
def test_verify_dispatch():
    ex = Example("x", "q", "e", {"choices": []})
    assert verify("commonsenseqa", ex, " Therefore, the answer is blotter (e).") is None
    assert verify("cqa", ex, "anything") is None
    assert verify("gsm8k", ex, " no calculator here\n#### 3") is None
    assert verify("arithmetic", problem(29, 57), scratchpad(29, 57)) is True
    assert verify("arithmetic", problem(29, 57), scratchpad(29, 57).replace("C: 1", "C: 0")) is False
    with pytest.raises(ValueError, match="valid tasks"):
        verify("svamp", ex, "")
