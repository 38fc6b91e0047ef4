"""The STaR outer loop (ezelikman/STaR `iteration_train.py`), in one process.

Iteration n: M(n-1) (the base when n = 1) answers the training questions -> keep the correct rationales, rationalize
the wrong ones with the hint -> write the kept examples as text -> pack to TFRecords with a completion loss mask ->
fine-tune THE BASE model (the original; or M(n-1) with finetune_from="previous") for steps(n) -> M(n) -> evaluate M(n)
on dev -> record. Iteration 0 evaluates the base. Optionally a slice of old data (replay_file) joins every fine-tune.

Everything an iteration makes lives in `{out_dir}/iter_{n:02d}/`; each stage leaves a file that says it finished, so
the same command, rerun after a kill, continues where it stopped and never appends an example twice.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import time
from typing import Any, List, Optional

from . import report
from .rationales import EOT, PassOptions, accuracy_by_class, run_pass, summarize, training_example

log = logging.getLogger("star")

# Test hook: STAR_TEST_KILL_AT="generate" | "train" | "eval", optionally ":N" for iteration N (default 1), SIGKILLs the
# process right after the first chunk of that iteration's rationales (generate) or dev answers (eval) is on disk, or
# at the first training step after a checkpoint of that iteration was committed (train). tests/test_star_loop.py uses
# it to check that rerunning the command after a crash gives the uninterrupted run's files.
KILL_ENV = "STAR_TEST_KILL_AT"
# A base model's own training examples, beside its params (scripts/pretrain_arithmetic_base.py writes them); the
# default --replay_file of iteration_train.py when the base has one
PRETRAIN_PAIRS = "pretrain_pairs.jsonl"


def _test_kill_hook(stage: str, n: int) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    want, _, at = spec.partition(":")
    if want == stage and n == int(at or 1):
        log.warning("%s=%s: killing this process (test hook)", KILL_ENV, spec)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclasses.dataclass
class StarOptions:
    task: str = "arithmetic"
    data_dir: Optional[str] = None
    out_dir: str = "runs/star"
    rationalize: bool = False
    p_rationalization: float = 1.0
    p_show_hint_save: float = 0.0
    few_shot_train: bool = False
    no_prompt: bool = False
    direct: bool = False
    n_iters: int = 64
    start_iter: int = 1
    n_train_samples: int = 10000
    gen_length: int = 96
    gradient_accumulation_steps: int = 8
    exponential_grow: bool = False
    steady_grow: bool = False
    start_steps: float = 40.0
    add_steps: float = 20.0
    grow_steps: float = 1.2
    base_epochs: float = 1.0
    add_epochs: float = 0.2
    sequence_count: int = 10
    copy_n: int = 0
    max_steps: Optional[int] = None
    dry_run: bool = False
    skip_eval: bool = False
    eval_base: bool = True
    n_dev_samples: Optional[int] = None
    eval_batch_size: int = 64
    verify_rationales: bool = False
    n_samples: int = 1  # rationales sampled per question (1 = greedy, as the original)
    temperature: float = 0.0
    seed: int = 0
    progress: bool = True
    task_options: dict = dataclasses.field(default_factory=dict)
    gold: bool = False  # baseline: train on gold completions of the sampled questions, not on rationales
    train_classes: Optional[tuple] = None  # only training questions of these answer classes (e.g. digit counts)
    finetune_from: str = "base"  # "base" (the original: every iteration restarts from the base) or "previous"
    replay_file: Optional[str] = None  # JSONL of {context, completion} mixed into every fine-tune (see replay_n)
    replay_n: int = 0  # examples drawn (with replacement) from replay_file per iteration
    carry_optimizer: bool = False  # finetune_from="previous" only: continue M(n-1)'s Adam moments too


def n_steps(opts: StarOptions, iteration: int, n_examples: int) -> int:
    """Fine-tuning steps of iteration n (1-based), as the original's get_n_steps, capped by max_steps.

    exponential: int(start * grow**(n-1)); steady: int(start + add*(n-1)); otherwise epochs over the kept examples:
    int(n_examples * (base_epochs + add_epochs*(n-1)) // (GA * sequence_count)). The original counted examples by
    splitting the text on blank lines, which counts a file of concatenated CQA examples as one; we count examples.
    """
    if opts.steady_grow:
        steps = int(opts.start_steps + opts.add_steps * (iteration - 1))
    elif opts.exponential_grow:
        steps = int(opts.start_steps * (opts.grow_steps ** (iteration - 1)))
    else:
        epochs = opts.base_epochs + opts.add_epochs * (iteration - 1)
        steps = int(n_examples * epochs // (opts.gradient_accumulation_steps * opts.sequence_count))
    if opts.max_steps is not None:
        steps = min(steps, opts.max_steps)
    return steps


def iter_dir(opts: StarOptions, n: int) -> str:
    return os.path.join(opts.out_dir, f"iter_{n:02d}")


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_jsonl_pairs(path: str) -> List[tuple]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(r["context"], r["completion"]) for r in map(json.loads, filter(str.strip, f))]


def _read_replay_file(path: str) -> List[tuple]:
    """The user's --replay_file: one {"context": str, "completion": str} object per line; a bad line is named."""
    pairs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pair = (record["context"], record["completion"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--replay_file {path} line {lineno}: expected a JSON object with string "
                                 f"\"context\" and \"completion\", got {line.strip()[:80]!r}") from None
            if not all(isinstance(x, str) for x in pair):
                raise ValueError(f"--replay_file {path} line {lineno}: \"context\" and \"completion\" must be "
                                 f"strings")
            pairs.append(pair)
    if not pairs:
        raise ValueError(f"--replay_file {path} has no examples; give one {{\"context\", \"completion\"}} JSON "
                         f"object per line")
    return pairs


def _write_training_text(d: str, pairs: List[tuple]) -> None:
    """An iteration's training examples: train.txt (the original's format) and train.jsonl (what is packed)."""
    _write_atomic(os.path.join(d, "train.txt"), "".join(c + t + EOT for c, t in pairs))
    _write_atomic(os.path.join(d, "train.jsonl"),
                  "".join(json.dumps({"context": c, "completion": t}) + "\n" for c, t in pairs))


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class StarRun:
    """Runs the loop. `backend` supplies the model: `base_params()`, `load_params(ckpt_dir)`,
    `generate_fn(params)`, `finetune(params, index_path, steps, ckpt_dir, desc=, on_step=)` (with `init_ckpt=` too
    when carry_optimizer is on) and `pack(pairs_path, out_dir)`."""

    def __init__(self, opts: StarOptions, task, backend, title: Optional[str] = None):
        self.opts, self.task, self.backend = opts, task, backend
        self.title = title or f"STaR on {opts.task}"
        os.makedirs(opts.out_dir, exist_ok=True)
        self.results_path = os.path.join(opts.out_dir, "results.json")
        self.train_examples = task.load("train")
        self.dev_examples = task.load("dev")
        if opts.n_dev_samples:
            self.dev_examples = self.dev_examples[:opts.n_dev_samples]
        # read the prompt files now: a missing one should fail before the model is loaded, not after the base eval
        task.few_shot_prompt(hint=False, direct=opts.direct)
        if opts.finetune_from not in ("base", "previous"):
            raise ValueError(f"finetune_from must be 'base' or 'previous', not {opts.finetune_from!r}")
        if opts.carry_optimizer and opts.finetune_from != "previous":
            raise ValueError("carry_optimizer continues the previous iteration's optimizer state, so it needs "
                             "finetune_from='previous'")
        if opts.replay_n > 0 and not opts.replay_file:
            raise ValueError("replay_n > 0 needs a replay_file (JSONL of {context, completion} per line)")
        if opts.replay_file and not os.path.exists(opts.replay_file):
            raise FileNotFoundError(f"--replay_file {opts.replay_file} does not exist")
        # read now: a bad file should fail before the model is loaded, not after an iteration's generation
        self._replay_pool = _read_replay_file(opts.replay_file) if opts.replay_file and opts.replay_n > 0 else None
        if opts.rationalize:
            task.few_shot_prompt(hint=True, direct=opts.direct)

    # ------------------------------------------------------------------ stages
    def _pass_options(self, n: int, split: str) -> PassOptions:
        o = self.opts
        return PassOptions(rationalize=o.rationalize and split == "train", p_rationalization=o.p_rationalization,
                           p_show_hint_save=o.p_show_hint_save, few_shot_train=o.few_shot_train,
                           no_prompt=o.no_prompt and n > 1, direct=o.direct, gen_length=o.gen_length,
                           chunk_size=o.eval_batch_size, seed=o.seed * 1000 + n, verify=o.verify_rationales,
                           n_samples=o.n_samples if split == "train" else 1,
                           progress=o.progress, desc=f"iter {n} {split}")

    def sample_train(self, n: int) -> List[Any]:
        """The original shuffles the train split and takes n_train_samples, anew each iteration."""
        examples = list(self.train_examples)
        if self.opts.train_classes:
            examples = [ex for ex in examples if self.task.answer_classes(ex) in self.opts.train_classes]
        random.Random(self.opts.seed * 1000 + n).shuffle(examples)
        return examples[:self.opts.n_train_samples]

    def evaluate(self, n: int, params) -> dict:
        d = iter_dir(self.opts, n)
        done = _read_json(os.path.join(d, "eval.json"))
        if done is not None:
            return done
        records = run_pass(self.task, self.dev_examples, self.backend.generate_fn(params),
                           self._pass_options(n, "dev"), os.path.join(d, "eval.jsonl"),
                           on_chunk=lambda: _test_kill_hook("eval", n))
        result = {"accuracy": accuracy_by_class(records), "n": len(records)}
        _write_atomic(os.path.join(d, "eval.json"), json.dumps(result, indent=2))
        return result

    def generate(self, n: int, params) -> dict:
        """Rationales of M(n-1) on this iteration's training questions -> {d}/train.txt; returns the summary."""
        d = iter_dir(self.opts, n)
        summary = _read_json(os.path.join(d, "generation.json"))
        if summary is not None:
            return summary
        examples = self.sample_train(n)
        by_id = {ex.id: ex for ex in examples}
        opts = self._pass_options(n, "train")
        if self.opts.gold:
            return self._gold_examples(d, examples, n)
        records = run_pass(self.task, examples, self.backend.generate_fn(params), opts,
                           os.path.join(d, "rationales.jsonl"), on_chunk=lambda: _test_kill_hook("generate", n))
        pairs = [training_example(self.task, r, by_id[r["id"]], opts) for r in records if r["keep"]]
        if self.opts.copy_n and n > 1:  # the original also copied the last copy_n examples of the previous iteration
            prev = _read_jsonl_pairs(os.path.join(iter_dir(self.opts, n - 1), "train.jsonl"))
            if self._replay_pool is not None:  # without that iteration's replayed examples (written last)
                prev = prev[:len(prev) - self.opts.replay_n]
            pairs = prev[-self.opts.copy_n:] + pairs
        pairs = pairs + self._replay(n)
        _write_training_text(d, pairs)
        summary = summarize(records)
        _write_atomic(os.path.join(d, "generation.json"), json.dumps(summary, indent=2))
        return summary

    def _replay(self, n: int) -> List[tuple]:
        """replay_n pairs drawn from replay_file for iteration n (none without a file): old knowledge the fine-tune
        should not erase, e.g. the demo base's own pretraining data. They go last into train.jsonl (packing shuffles)
        but do not count as kept examples, so they add no steps."""
        o = self.opts
        if self._replay_pool is None:
            return []
        rng = random.Random(o.seed * 1000 + n + 500)
        return [self._replay_pool[rng.randrange(len(self._replay_pool))] for _ in range(o.replay_n)]

    def _gold_examples(self, d: str, examples, n: int) -> dict:
        """The supervised baselines: train on the gold completions (answers only with --direct) of the sampled
        questions instead of the model's own rationales."""
        task = self.task
        target = task.direct_completion if self.opts.direct else getattr(task, "reference_completion", None)
        if target is None:
            raise ValueError(f"task {task.name} has no gold rationales; use --gold with --direct")
        gold = [(task.format_question(ex), target(ex)) for ex in examples]
        pairs = gold + self._replay(n)
        _write_training_text(d, pairs)
        summary = {"n": len(gold), "kept": len(gold), "rationalized": 0, "gold": True}
        _write_atomic(os.path.join(d, "generation.json"), json.dumps(summary, indent=2))
        return summary

    # ------------------------------------------------------------------ the loop
    def run(self) -> List[dict]:
        o = self.opts
        rows = {r["iteration"]: r for r in report.load_results(self.results_path)}
        base = self.backend.base_params()
        if o.eval_base and not o.skip_eval and 0 not in rows and not o.dry_run:
            t0 = time.time()
            os.makedirs(iter_dir(o, 0), exist_ok=True)
            ev = self.evaluate(0, base)
            rows[0] = {"iteration": 0, "steps": 0, "dev_accuracy": ev["accuracy"], "seconds": time.time() - t0}
            self._save(rows)
        prev_params = base
        for n in range(max(1, o.start_iter), o.n_iters + 1):
            d = iter_dir(o, n)
            if n in rows and rows[n].get("complete"):
                prev_params = None  # loaded lazily if a later iteration needs generation
                continue
            if prev_params is None:
                prev_params = self._latest_model(rows, n, base)
            os.makedirs(d, exist_ok=True)
            t0 = time.time()
            log.info("iteration %d: generating rationales with the model of iteration %d", n,
                     max([m for m in rows if 0 < m < n and not rows[m].get("skipped")] or [0]))
            if o.dry_run:
                log.info("dry run: would generate, pack, train and evaluate iteration %d", n)
                continue
            gen = self.generate(n, prev_params)
            row = {"iteration": n, "train": gen}
            if gen["kept"] == 0:
                log.warning("iteration %d kept no examples: nothing to fine-tune on; skipping it", n)
                row.update(steps=0, skipped=True, complete=True, seconds=time.time() - t0)
                rows[n] = row
                self._save(rows)
                continue
            index = self.backend.pack(os.path.join(d, "train.jsonl"), os.path.join(d, "records"))
            steps = n_steps(o, n, gen["kept"])
            row["steps"] = steps
            ckpt_dir = os.path.join(d, "ckpt")

            def on_step(step, record, n=n, ckpt_dir=ckpt_dir):
                if os.path.exists(os.path.join(ckpt_dir, "meta.json")):  # a checkpoint of this iteration exists
                    _test_kill_hook("train", n)

            start = prev_params if o.finetune_from == "previous" else base
            extra = {}
            if o.carry_optimizer:  # M(n-1)'s checkpoint holds its Adam state; iteration 1 starts a fresh one
                extra["init_ckpt"] = self._latest_ckpt_dir(rows, n)
            params = self.backend.finetune(start, index, steps, ckpt_dir, desc=f"iter {n} train", on_step=on_step,
                                           **extra)
            if not o.skip_eval:
                row["dev_accuracy"] = self.evaluate(n, params)["accuracy"]
            row.update(complete=True, seconds=time.time() - t0)
            rows[n] = row
            self._save(rows)
            prev_params = params
        return [rows[k] for k in sorted(rows)]

    def _latest_ckpt_dir(self, rows: dict, n: int) -> Optional[str]:
        """The checkpoint folder of M(n-1), the last iteration before n that trained (one may be skipped); None when
        none has (M(n-1) is the base)."""
        for m in range(n - 1, 0, -1):
            if m in rows and rows[m].get("complete") and not rows[m].get("skipped"):
                return os.path.join(iter_dir(self.opts, m), "ckpt")
        return None

    def _latest_model(self, rows: dict, n: int, base):
        """M(n-1): the params of the last iteration before n that trained, or the base."""
        ckpt_dir = self._latest_ckpt_dir(rows, n)
        return base if ckpt_dir is None else self.backend.load_params(ckpt_dir)

    def _save(self, rows: dict) -> None:
        ordered = [rows[k] for k in sorted(rows)]
        report.save_results(self.results_path, ordered)
        o = self.opts
        notes = {"task": o.task, "rationalize": o.rationalize, "train questions per iteration": o.n_train_samples,
                 **({"train question classes": ", ".join(o.train_classes)} if o.train_classes else {}),
                 "dev questions": len(self.dev_examples)}
        report.write_report(o.out_dir, ordered, self.title, notes)
