"""The STaR outer loop (ezelikman/STaR `iteration_train.py`), in one process.

Iteration n: M(n-1) (the base when n = 1) answers the training questions -> keep the correct rationales, rationalize
the wrong ones with the hint -> write the kept examples as text -> pack to TFRecords with a completion loss mask ->
fine-tune THE BASE model (the original; or M(n-1) with finetune_from="previous") for steps(n) -> M(n) -> evaluate M(n)
on dev -> record. Iteration 0 evaluates the base. Optionally a slice of old data (replay_file) joins every fine-tune.

Everything an iteration makes lives in `{out_dir}/iter_{n:02d}/`; each stage leaves a file that says it finished
(generation.json, records/train.index, the checkpoint's meta.json, eval.json), so the same command, rerun after a
kill, continues where it stopped and never appends an example twice. `StarRun.run` is only the algorithm; its hooks
(`on_chunk`, `on_train_step`, `on_row`) are no-ops that tests and loggers fill in. Every option is a field of
`StarOptions` (with `PassOptions` nested), whose metadata also makes iteration_train.py's flags (star/flags.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import time
from typing import Any, List, Optional

from . import report
from .flags import option
from .rationales import EOT, PassOptions, accuracy_by_class, run_pass, summarize, training_example

log = logging.getLogger("star")

# A base model's own training examples, beside its params (scripts/pretrain_arithmetic_base.py writes them); the
# default --replay_file of iteration_train.py when the base has one
PRETRAIN_PAIRS = "pretrain_pairs.jsonl"


@dataclasses.dataclass
class StarOptions:
    task: str = option("arithmetic", "arithmetic (default: the CPU demo), commonsenseqa (cqa) or gsm8k (gsm)")
    data_dir: Optional[str] = option(
        None, "folder in the STaR repo layout (commonsenseqa/..., gsm/...) for the real tasks, e.g. "
              "../shared/data/star; not needed for arithmetic", flags=("--data-dir", "--data_dir"))
    out_dir: str = option("runs/star", "experiment folder (default runs/star_<task>)", flags=("--out-dir", "--out_dir"))
    generation: PassOptions = option(factory=PassOptions)  # the pass options (their flags are generated too)
    n_iters: int = option(64, "number of outer-loop iterations: N runs iterations 1..N (the original's loop ran "
                              "N-1; docs/DEVIATIONS.md)", type=int)
    start_iter: int = option(1, "first iteration to run (earlier ones must exist in --out-dir)", type=int)
    n_train_samples: int = option(10000, "training questions sampled per iteration", type=int)
    n_dev_samples: Optional[int] = option(None, "evaluate on the first N dev questions only (default: all)", type=int)
    gradient_accumulation_steps: int = option(8, "micro-batches per optimizer step", type=int)
    exponential_grow: bool = option(False, "steps(n) = start_steps * grow_steps**(n-1) (the paper's)",
                                    action="store_true")
    steady_grow: bool = option(False, "steps(n) = start_steps + add_steps*(n-1)",
                               action=argparse.BooleanOptionalAction)
    start_steps: float = option(40.0, "steps of the first iteration (grow modes)", type=float)
    add_steps: float = option(20.0, "steps added per iteration (steady mode)", type=float)
    grow_steps: float = option(1.2, "growth factor per iteration (exponential mode)", type=float)
    base_epochs: float = option(1.0, "epochs of the first iteration (epoch mode, the default when neither grow flag "
                                     "is set)", type=float)
    add_epochs: float = option(0.2, "epochs added per iteration (epoch mode)", type=float)
    sequence_count: int = option(10, "examples per optimizer step on average (epoch mode: steps = kept * epochs / "
                                     "(GA * this))", type=int)
    copy_n: int = option(0, "also train on the last N examples of the previous iteration", type=int)
    max_steps: Optional[int] = option(None, "cap on steps per iteration (the paper capped GSM8K at 7912)", type=int,
                                      flags=("--max-steps", "--max_steps"))
    dry_run: bool = option(False, "print the plan, run nothing", action="store_true")
    skip_eval: bool = option(False, "do not evaluate on dev", action="store_true")
    eval_base: bool = True  # evaluate the base model as iteration 0
    eval_batch_size: int = option(64, "questions per generation batch", type=int)
    temperature: float = option(0.0, "sampling temperature of all generation (0 = greedy, as the paper)", type=float)
    seed: int = option(0, "seed of the question sampling and of the rationalization coin flips", type=int)
    progress: bool = option(True, "no tqdm bars", flags=("--no-progress",), action="store_false")
    task_options: dict = dataclasses.field(default_factory=dict)
    gold: bool = option(False, "baseline: fine-tune on the gold completions of the sampled questions (gold "
                               "scratchpads, or answers only with --direct) instead of on the model's rationales",
                        action="store_true")
    train_classes: Optional[tuple] = None  # only training questions of these answer classes (e.g. digit counts)
    finetune_from: str = option(
        "base", "start each iteration's fine-tune from the base model (the original) or from the previous "
                "iteration's model (the demo: its tiny model learns too little per iteration from the base)",
        choices=("base", "previous"))
    carry_optimizer: bool = option(
        False, "with --finetune_from previous: each fine-tune also continues the previous iteration's Adam moments "
               "(read from its checkpoint; the learning-rate schedule and warm-up restart) instead of a fresh "
               "optimizer", action=argparse.BooleanOptionalAction)
    replay_file: Optional[str] = option(
        None, "JSONL of {\"context\", \"completion\"} examples mixed into every fine-tune (see --replay_n); default: "
              "pretrain_pairs.jsonl in the base model's folder, when --replay_n > 0 and the base has one (the demo's "
              "does)")
    replay_n: int = option(0, "examples drawn from --replay_file per iteration, with replacement (0 when the base "
                              "has no pretrain_pairs.jsonl); they are trained on but add no steps and are not "
                              "counted as kept", type=int)
    anneal_each_finetune: bool = option(
        False, "each fine-tune's learning rate decays (cosine) to the config's end_lr over its own steps, instead of "
               "following the config's anneal_steps (the original: anneal_steps 300000, so the rate stays near its "
               "peak)", action=argparse.BooleanOptionalAction)


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
    """Runs the loop. `backend` supplies the model (star/backend.py's JaxBackend keeps it on the devices):
    `base_params()`, `load_params(ckpt_dir)`, `generate_fn(params)`, `finetune(params, index_path, steps, ckpt_dir,
    desc=, on_step=)` (with `init_ckpt=` too when carry_optimizer is on) and `pack(pairs_path, out_dir)`; the params
    it returns are opaque to the loop."""

    def __init__(self, opts: StarOptions, task, backend, title: Optional[str] = None):
        self.opts, self.task, self.backend = opts, task, backend
        self.title = title or f"STaR on {opts.task}"
        os.makedirs(opts.out_dir, exist_ok=True)
        self.results_path = os.path.join(opts.out_dir, "results.json")
        self._rows: dict = {}  # iteration -> results row, as run() goes
        self.train_examples = task.load("train")
        self.dev_examples = task.load("dev")
        if opts.n_dev_samples:
            self.dev_examples = self.dev_examples[:opts.n_dev_samples]
        # read the prompt files now: a missing one should fail before the model is loaded, not after the base eval
        task.few_shot_prompt(hint=False, direct=opts.generation.direct)
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
        if opts.generation.rationalize:
            task.few_shot_prompt(hint=True, direct=opts.generation.direct)

    # ------------------------------------------------------------------ stages
    def _pass_options(self, n: int, split: str) -> PassOptions:
        o = self.opts
        g = o.generation
        return dataclasses.replace(g, rationalize=g.rationalize and split == "train", no_prompt=g.no_prompt and n > 1,
                                   chunk_size=o.eval_batch_size * getattr(self.backend, "generation_batches", 1),
                                   seed=o.seed * 1000 + n,
                                   n_samples=g.n_samples if split == "train" else 1, progress=o.progress,
                                   desc=f"iter {n} {split}")

    def sample_train(self, n: int) -> List[Any]:
        """The original shuffles the train split and takes n_train_samples, anew each iteration."""
        examples = list(self.train_examples)
        if self.opts.train_classes:
            examples = [ex for ex in examples if self.task.answer_classes(ex) in self.opts.train_classes]
        random.Random(self.opts.seed * 1000 + n).shuffle(examples)
        return examples[:self.opts.n_train_samples]

    def evaluate(self, n: int, params) -> dict:
        """M(n) on the dev questions (done-file: eval.json; answers stream to eval.jsonl)."""
        d = iter_dir(self.opts, n)
        done = _read_json(os.path.join(d, "eval.json"))
        if done is not None:
            return done
        os.makedirs(d, exist_ok=True)
        records = run_pass(self.task, self.dev_examples, self.backend.generate_fn(params),
                           self._pass_options(n, "dev"), os.path.join(d, "eval.jsonl"),
                           on_chunk=lambda: self.on_chunk("eval", n))
        result = {"accuracy": accuracy_by_class(records), "n": len(records)}
        _write_atomic(os.path.join(d, "eval.json"), json.dumps(result, indent=2))
        return result

    def generate(self, n: int, params) -> dict:
        """Rationales of M(n-1) on this iteration's training questions -> {d}/train.jsonl (done-file:
        generation.json, the summary it returns; rationales stream to rationales.jsonl)."""
        d = iter_dir(self.opts, n)
        summary = _read_json(os.path.join(d, "generation.json"))
        if summary is not None:
            return summary
        os.makedirs(d, exist_ok=True)
        rows = self._rows
        log.info("iteration %d: generating rationales with the model of iteration %d", n,
                 max([m for m in rows if 0 < m < n and not rows[m].get("skipped")] or [0]))
        examples = self.sample_train(n)
        by_id = {ex.id: ex for ex in examples}
        opts = self._pass_options(n, "train")
        if self.opts.gold:
            return self._gold_examples(d, examples, n)
        records = run_pass(self.task, examples, self.backend.generate_fn(params), opts,
                           os.path.join(d, "rationales.jsonl"), on_chunk=lambda: self.on_chunk("generate", n))
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
        target = task.direct_completion if self.opts.generation.direct else getattr(task, "reference_completion", None)
        if target is None:
            raise ValueError(f"task {task.name} has no gold rationales; use --gold with --direct")
        gold = [(task.format_question(ex), target(ex)) for ex in examples]
        pairs = gold + self._replay(n)
        _write_training_text(d, pairs)
        summary = {"n": len(gold), "kept": len(gold), "rationalized": 0, "gold": True}
        _write_atomic(os.path.join(d, "generation.json"), json.dumps(summary, indent=2))
        return summary

    def pack(self, n: int) -> str:
        """{d}/train.jsonl -> TFRecords with a completion loss mask (done-file: records/train.index)."""
        d = iter_dir(self.opts, n)
        return self.backend.pack(os.path.join(d, "train.jsonl"), os.path.join(d, "records"))

    def finetune(self, n: int, start, index: str, steps: int):
        """M(n) = start fine-tuned for `steps` steps (done-file: the checkpoint of the last step; a killed fine-tune
        resumes from its last checkpoint). With carry_optimizer, M(n-1)'s checkpoint also gives the Adam state."""
        ckpt_dir = os.path.join(iter_dir(self.opts, n), "ckpt")
        extra = {}
        if self.opts.carry_optimizer:  # M(n-1)'s checkpoint holds its Adam state; iteration 1 starts a fresh one
            extra["init_ckpt"] = self._latest_ckpt_dir(self._rows, n)
        return self.backend.finetune(start, index, steps, ckpt_dir, desc=f"iter {n} train",
                                     on_step=lambda step, record: self.on_train_step(n, step, ckpt_dir), **extra)

    # ------------------------------------------------------------------ hooks: no-ops here, for tests and tools
    def on_chunk(self, stage: str, n: int) -> None:
        """Called after each chunk of iteration n's rationales (stage "generate") or dev answers ("eval") is on
        disk."""

    def on_train_step(self, n: int, step: int, ckpt_dir: str) -> None:
        """Called after every fine-tuning step of iteration n, whose checkpoints go to ckpt_dir."""

    def on_row(self, row: dict) -> None:
        """Called once per results row this run records (iteration 0, then each finished or skipped iteration),
        after it is on disk: e.g. W&B logging (iteration_train.py)."""

    # ------------------------------------------------------------------ the loop
    def run(self) -> List[dict]:
        """The algorithm: M(0) = base; for n = 1..N: generate with M(n-1) -> pack -> fine-tune (the base, or M(n-1))
        -> M(n) -> evaluate. Each stage returns at once when its done-file exists, so a rerun continues."""
        o = self.opts
        rows = self._rows = {r["iteration"]: r for r in report.load_results(self.results_path)}
        if o.dry_run:
            self._print_plan(rows)
            return [rows[k] for k in sorted(rows)]
        base = self.backend.base_params()
        if o.eval_base and not o.skip_eval and 0 not in rows:
            t0 = time.time()
            ev = self.evaluate(0, base)
            rows[0] = {"iteration": 0, "steps": 0, "dev_accuracy": ev["accuracy"], "seconds": time.time() - t0}
            self._save(rows)
            self.on_row(rows[0])
        model = base  # M(n-1)
        for n in range(max(1, o.start_iter), o.n_iters + 1):
            if n in rows and rows[n].get("complete"):
                model = None  # loaded lazily if a later iteration needs it
                continue
            model = model if model is not None else self._latest_model(rows, n, base)
            t0 = time.time()
            gen = self.generate(n, model)
            if gen["kept"] == 0:
                log.warning("iteration %d kept no examples: nothing to fine-tune on; skipping it", n)
                rows[n] = {"iteration": n, "train": gen, "steps": 0, "skipped": True, "complete": True,
                           "seconds": time.time() - t0}
                self._save(rows)
                self.on_row(rows[n])
                continue
            index = self.pack(n)
            steps = n_steps(o, n, gen["kept"])
            model = self.finetune(n, model if o.finetune_from == "previous" else base, index, steps)
            rows[n] = {"iteration": n, "train": gen, "steps": steps}
            if not o.skip_eval:
                rows[n]["dev_accuracy"] = self.evaluate(n, model)["accuracy"]
            rows[n].update(complete=True, seconds=time.time() - t0)
            self._save(rows)
            self.on_row(rows[n])
        return [rows[k] for k in sorted(rows)]

    def _print_plan(self, rows: dict) -> None:
        o = self.opts
        for n in range(max(1, o.start_iter), o.n_iters + 1):
            state = "done" if rows.get(n, {}).get("complete") else "to run"
            log.info("dry run: iteration %d (%s): generate with M(%d), pack, fine-tune %s, evaluate", n, state,
                     n - 1, "M(n-1)" if o.finetune_from == "previous" else "the base")

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
        notes = {"task": o.task, "rationalize": o.generation.rationalize, "train questions per iteration": o.n_train_samples,
                 **({"train question classes": ", ".join(o.train_classes)} if o.train_classes else {}),
                 "dev questions": len(self.dev_examples)}
        report.write_report(o.out_dir, ordered, self.title, notes)
