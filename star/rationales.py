"""Generate -> parse -> filter -> rationalize: one STaR pass over a list of questions (ezelikman/STaR
`device_inference.py`, `eval_examples`/`eval_output`).

Each question is answered with the few-shot prompt; a correct answer keeps its rationale. With rationalization, a
wrong question is retried (with probability `p_rationalization`) with the hinted prompt, and a now-correct rationale
is kept with the hint removed from the saved text (kept with probability `p_show_hint_save`). Saved training text =
(few-shot prompt if few_shot_train) + question + completion + "<|endoftext|>".

Differences from the original, on purpose: every example is evaluated (the original dropped a final partial batch
and left leftover hint examples unrationalized); the random choices are drawn per example from (seed, example id),
so a resumed run makes the same choices; results stream to a JSONL, one line per example, so a killed run resumes
without repeating or duplicating work.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from tqdm.auto import tqdm

from .flags import option
from .verify import verify as verify_steps

EOT = "<|endoftext|>"

# generate_fn(prompts, shared_prefix, max_new_tokens, stop) -> completions (text after each prompt).
# `shared_prefix` is the few-shot text every prompt starts with ("" when none); prompts exclude it.
GenerateFn = Callable[[Sequence[str], str, int, Sequence[str]], List[str]]


@dataclasses.dataclass
class PassOptions:
    """One pass's settings; the ones with help are also iteration_train.py flags (star/flags.py)."""
    rationalize: bool = option(False, "retry wrong answers with the answer as a hint (the original: off)",
                               action=argparse.BooleanOptionalAction)
    p_rationalization: float = option(1.0, "share of wrong examples to rationalize", type=float)
    p_show_hint_save: float = option(0.0, "share of rationalized examples saved WITH the hint (the original: 0; the "
                                          "demo's tiny model otherwise unlearns using hints after one iteration)",
                                     type=float)
    few_shot_train: bool = option(False, "save the few-shot prompt in front of each training example",
                                  action="store_true")
    no_prompt: bool = option(False, "after iteration 1, generate without the few-shot prompt", action="store_true")
    direct: bool = option(False, "answer directly, without rationales (the direct baseline)", action="store_true")
    gen_length: int = option(96, "maximum new tokens per rationale", type=int)
    chunk_size: int = 64  # questions per generate call (and per flush to disk)
    seed: int = 0
    verify: bool = option(False, "drop kept rationales whose checkable steps are wrong (arithmetic lines, GSM8K "
                                 "<<a*b=c>> annotations)", flags=("--verify_rationales",), action="store_true")
    n_samples: int = option(1, "rationales sampled per training question (with --temperature > 0); distinct correct "
                               "ones are all kept", type=int)
    progress: bool = True
    desc: str = "generate"


def _coin(seed: int, key: str, salt: str) -> float:
    """A uniform draw that depends only on (seed, example, purpose), so resumed runs draw the same."""
    return random.Random(f"{seed}:{salt}:{key}").random()


def read_jsonl(path: str) -> List[dict]:
    """Reads a JSONL file written by this module; a torn last line (crash mid-write) is dropped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last, unterminated line of a crashed write
                break
            raise ValueError(f"{path} line {i + 1} is not valid JSON; delete the file to regenerate it")
    return records


def _rewrite_jsonl(path: str, records: Iterable[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _generate_records(task, examples, generate_fn: GenerateFn, opts: PassOptions, hint: bool,
                      out_path: str, done: Dict[str, dict], bar, on_chunk: Optional[Callable[[], None]]) -> None:
    """Answers `examples` (hinted or not), appending one record per example to out_path in chunks."""
    prompt = "" if opts.no_prompt else task.few_shot_prompt(hint=hint, direct=opts.direct)
    samples = 1 if hint else max(1, opts.n_samples)
    todo = [(ex, _record_key(ex.id, hint, j)) for ex in examples for j in range(samples)]
    todo = [(ex, key) for ex, key in todo if key not in done]
    for start in range(0, len(todo), opts.chunk_size):
        chunk = todo[start:start + opts.chunk_size]
        questions = [task.format_question(ex, hint=hint) for ex, _ in chunk]
        completions = generate_fn(questions, prompt, opts.gen_length, task.stop)
        lines = []
        for (ex, key), completion in zip(chunk, completions):
            record = _judge(task, ex, completion, hint, opts, key)
            done[key] = record
            lines.append(json.dumps(record) + "\n")
        with open(out_path, "a") as f:  # one write per chunk; a torn tail is dropped on read
            f.writelines(lines)
        bar.update(len({ex.id for ex, _ in chunk}) if samples == 1 else len(chunk) / samples)
        if on_chunk is not None:
            on_chunk()


def _record_key(example_id: str, hint: bool, sample: int = 0) -> str:
    """`{id}` for the first answer, `{id}#s{j}` for further samples, `{id}_r` for the rationalization."""
    return f"{example_id}{'_r' if hint else ''}{f'#s{sample}' if sample else ''}"


def _judge(task, ex, completion: str, hint: bool, opts: PassOptions, key: str) -> dict:
    completion = completion.split(EOT)[0]
    completion = task.truncate(completion)  # the part that is judged and saved (e.g. CQA's first line)
    pred = task.parse_answer(completion)
    correct = pred is not None and task.is_correct(pred, ex)
    record = {"id": ex.id, "key": key, "class": task.answer_classes(ex),
              "question": task.format_question(ex, hint=False), "completion": completion, "pred": pred,
              "gold": ex.gold, "correct": bool(correct), "rationalized": hint}
    record["steps_ok"] = verify_steps(task.name, ex, completion)  # None where steps cannot be checked
    return record


def training_example(task, record: dict, ex, opts: PassOptions) -> tuple[str, str]:
    """(context, completion) of a kept example: the hint-less question (hinted with probability p_show_hint_save),
    after the few-shot prompt when few_shot_train; the completion is what the model wrote."""
    hinted = record["rationalized"] and _coin(opts.seed, ex.id, "show_hint") < opts.p_show_hint_save
    question = task.format_question(ex, hint=hinted)
    prefix = task.few_shot_prompt(hint=False, direct=opts.direct) if opts.few_shot_train else ""
    return prefix + question, record["completion"]


def training_text(task, record: dict, ex, opts: PassOptions) -> str:
    """The saved example as the original wrote it: context + completion + EOT."""
    context, completion = training_example(task, record, ex, opts)
    return context + completion + EOT


def run_pass(task, examples: Sequence, generate_fn: GenerateFn, opts: PassOptions, out_path: str,
             on_chunk: Optional[Callable[[], None]] = None) -> List[dict]:
    """Generates (and rationalizes) for every example; returns one final record per example, in input order.

    `out_path` (JSONL) holds every attempt; existing lines are reused, so calling again after a crash continues.
    A final record carries `keep` (True when its rationale goes into the training set). `on_chunk()` is called after
    each chunk of records has been appended to out_path (the loop's kill test hook uses it).
    """
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    existing = read_jsonl(out_path)
    done = {r["key"]: r for r in existing}
    if len(done) != len(existing) or (existing and os.path.getsize(out_path) and not _ends_with_newline(out_path)):
        _rewrite_jsonl(out_path, done.values())  # drop a torn tail or duplicates before appending
    bar = tqdm(total=len(examples), initial=sum(1 for ex in examples if _record_key(ex.id, False) in done),
               desc=opts.desc, disable=not opts.progress, dynamic_ncols=True)
    _generate_records(task, examples, generate_fn, opts, False, out_path, done, bar, on_chunk)
    bar.close()
    if opts.rationalize:
        wrong = [ex for ex in examples if _needs_hint(done, ex, opts)]
        bar = tqdm(total=len(wrong), initial=sum(1 for ex in wrong if _record_key(ex.id, True) in done),
                   desc=opts.desc + " (rationalize)", disable=not opts.progress, dynamic_ncols=True)
        _generate_records(task, wrong, generate_fn, opts, True, out_path, done, bar, on_chunk)
        bar.close()
    final = []
    for ex in examples:
        tries = [done[_record_key(ex.id, False, j)] for j in range(max(1, opts.n_samples))]
        correct = [r for r in tries if r["correct"]]
        record = correct[0] if correct else tries[0]
        if not correct and _record_key(ex.id, True) in done:
            record = done[_record_key(ex.id, True)]
        final.append({**record, "keep": _keep(record, opts), "first_correct": bool(correct)})
        seen = {record["completion"]}
        for extra in correct[1:]:  # further distinct correct samples are kept too
            if extra["completion"] not in seen:
                seen.add(extra["completion"])
                final.append({**extra, "keep": _keep(extra, opts), "first_correct": True, "extra_sample": True})
    return final


def _keep(record: dict, opts: PassOptions) -> bool:
    return bool(record["correct"]) and not (opts.verify and record.get("steps_ok") is False)


def _needs_hint(done: Dict[str, dict], ex, opts: PassOptions) -> Optional[bool]:
    tries = [done.get(_record_key(ex.id, False, j)) for j in range(max(1, opts.n_samples))]
    if any(r is None or r["correct"] for r in tries):
        return False
    return _coin(opts.seed, ex.id, "rationalize") < opts.p_rationalization


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def summarize(records: Sequence[dict]) -> dict:
    """Counts for the results table: accuracy (first try; overall and per answer class), kept, rationalized, right
    answer via wrong steps."""
    by_class = accuracy_by_class(records)
    kept = [r for r in records if r["keep"]]
    checked = [r for r in records if r["correct"] and r.get("steps_ok") is not None]
    return {
        "n": sum(1 for r in records if not r.get("extra_sample")),
        "accuracy": by_class.pop("all", 0.0),
        "accuracy_by_class": by_class,
        "kept": len(kept),
        "rationalized": sum(1 for r in kept if r["rationalized"]),
        "correct_wrong_steps": sum(1 for r in checked if r["steps_ok"] is False),
        "correct_wrong_steps_rationalized": sum(1 for r in checked if r["steps_ok"] is False and r["rationalized"]),
        "correct_checked": len(checked),
    }


def accuracy_by_class(records: Sequence[dict]) -> Dict[str, float]:
    """First-try accuracy per answer class (digit count for arithmetic), plus 'all'."""
    totals: Dict[str, List[int]] = {}
    for r in (r for r in records if not r.get("extra_sample")):
        for key in (str(r["class"]), "all"):
            hit = totals.setdefault(key, [0, 0])
            hit[0] += int(r["first_correct"])
            hit[1] += 1
    return {k: v[0] / v[1] for k, v in sorted(totals.items(), key=lambda kv: (kv[0] == "all", kv[0]))}
