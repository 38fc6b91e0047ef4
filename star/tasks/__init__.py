"""The STaR task protocol and the task registry.

A task turns a data set into prompts and judges what the model wrote. Terms used throughout:

- question: the text the model is asked, formatted by `format_question(ex, hint)`; with `hint=True` it reveals the
  answer (STaR's *rationalization*).
- few-shot prompt: `few_shot_prompt(hint, direct)` = `"\\n\\n".join(exemplars) + "\\n\\n"`, so the model's context is
  `prompt + question`, exactly as the original `device_inference.py` built it.
- completion: the generated text after the question. `truncate` cuts a raw generation to the part that is kept (and
  saved for fine-tuning); `parse_answer` reads the answer out of it; `is_correct` compares with the gold answer.
- direct: the answer-only format (no rationale) of the `--direct` baselines; `direct_completion(ex)` is its target.

Use `get_task(name, data_dir=None, **options)`; task names: `commonsenseqa` (alias `cqa`), `gsm8k` (alias `gsm`),
`arithmetic`. The data folder (the original repository's layout: `commonsenseqa/`, `gsm/`) comes from `data_dir`, else
the `STAR_DATA_DIR` environment variable, else `../shared/data/star` beside this checkout.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pathlib
from typing import Any, Iterator, Protocol, runtime_checkable

EOT = "<|endoftext|>"
SPLITS = ("train", "dev")
REPO = pathlib.Path(__file__).resolve().parents[2]  # the checkout: configs/ and assets/ of the task presets
# iteration_train.py's defaults of the original script (GPT-J-6B, configs/qa_base.json); each task's `loop_preset`
# starts from these
ORIGINAL_LOOP_PRESET = dict(
    config=str(REPO / "configs" / "qa_base.json"), base_model_location="gs://checkpoint-bucket/step_383500/",
    rationalize=False, n_iters=64, n_train_samples=10000, gen_length=96, gradient_accumulation_steps=8,
    start_steps=40, add_steps=20, eval_batch_size=8, base_epochs=1.0, add_epochs=0.2, sequence_count=10,
    p_show_hint_save=0.0, finetune_from="base", replay_n=0, anneal_each_finetune=False)


@dataclasses.dataclass(frozen=True)
class Example:
    """One question. `question` is the raw question (CQA stem, GSM8K problem, `9 6 4 + 4 9 4`); `gold` the answer
    string that `is_correct` compares with; `meta` whatever the task needs to format it (choices, solution, operands)."""
    id: str
    question: str
    gold: str
    meta: dict = dataclasses.field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str
    stop: tuple[str, ...]          # generation may stop once the completion contains one of these
    default_gen_length: int        # new tokens that fit (nearly) every reference completion

    def load(self, split: str) -> list[Example]: ...
    def format_question(self, ex: Example, hint: bool = False) -> str: ...
    def few_shot_prompt(self, hint: bool = False, direct: bool = False) -> str: ...
    def truncate(self, completion: str) -> str: ...
    def is_done(self, completion: str) -> bool: ...
    def parse_answer(self, completion: str) -> str | None: ...
    def is_correct(self, pred: str | None, ex: Example) -> bool: ...
    def answer_classes(self, ex: Example) -> str: ...
    def direct_completion(self, ex: Example) -> str: ...


class DataFormatError(ValueError):
    """A data file is not in the expected format; the message names the file and line."""


class TaskBase:
    """Shared plumbing of the file-backed tasks: the data folder, JSONL reading, prompt files."""
    name = "?"
    folder = "?"                   # sub-folder of the data dir, as in the original repository
    stop: tuple[str, ...] = ("\n\n",)
    default_gen_length = 96
    loop_preset: dict = {}         # iteration_train.py's defaults for this task (flag dest -> value)

    def __init__(self, data_dir: str | os.PathLike | None = None):
        self.data_dir = resolve_data_dir(data_dir)

    # -- files ------------------------------------------------------------------------------------------------------
    def path(self, filename: str) -> pathlib.Path:
        return self.data_dir / self.folder / filename

    def read_prompt_file(self, filename: str) -> list[str]:
        """The exemplars of a prompt file (split on blank lines, as the original's `read().split("\\n\\n")`)."""
        path = self.path(filename)
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.name}: prompt file {path} not found; pass --data-dir (data_dir=) pointing at the STaR data "
                f"folder that holds {self.folder}/{filename} (e.g. ../shared/data/star), or set STAR_DATA_DIR")
        text = path.read_text(encoding="utf-8").strip("\n")
        return text.split("\n\n")

    def read_jsonl(self, filename: str) -> Iterator[tuple[int, dict]]:
        """(1-based line number, object) for each non-blank line; a broken line raises DataFormatError naming it."""
        path = self.path(filename)
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.name}: data file {path} not found; pass --data-dir (data_dir=) pointing at the STaR data "
                f"folder that holds {self.folder}/ (e.g. ../shared/data/star), or set STAR_DATA_DIR")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path}:{lineno}: malformed JSON line ({err.msg} at column {err.colno})") \
                        from None
                if not isinstance(obj, dict):
                    raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj

    @staticmethod
    def check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")

    # -- defaults shared by the tasks -------------------------------------------------------------------------------
    def context(self, ex: Example, hint: bool = False, direct: bool = False, few_shot: bool = True) -> str:
        """What the model is given: few-shot prompt (unless `few_shot` is off) + question."""
        return (self.few_shot_prompt(hint=hint, direct=direct) if few_shot else "") + self.format_question(ex, hint)

    def answer_classes(self, ex: Example) -> str:
        return "all"

    def is_correct(self, pred: str | None, ex: Example) -> bool:
        return pred is not None and pred.strip().lower() == ex.gold.strip().lower()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_dir={str(self.data_dir)!r})"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    if data_dir is not None:
        return pathlib.Path(data_dir)
    if os.environ.get("STAR_DATA_DIR"):
        return pathlib.Path(os.environ["STAR_DATA_DIR"])
    return pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "star"


def model_part(exemplar: str, marker: str) -> str:
    """The completion part of a prompt exemplar: the text after the first `marker` (e.g. "\\nA:")."""
    if marker not in exemplar:
        raise DataFormatError(f"exemplar has no {marker!r}: {exemplar[:80]!r}...")
    return exemplar.split(marker, 1)[1]


# name -> "module:Class"; imported on first use so that `import star.tasks` stays cheap and cycle-free.
_REGISTRY = {
    "commonsenseqa": "star.tasks.commonsenseqa:CommonsenseQA",
    "gsm8k": "star.tasks.gsm8k:GSM8K",
    "arithmetic": "star.tasks.arithmetic:Arithmetic",
}
_ALIASES = {"cqa": "commonsenseqa", "gsm": "gsm8k"}


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        aliases = ", ".join(f"{a} -> {b}" for a, b in sorted(_ALIASES.items()))
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())} (aliases: {aliases})")
    return key


def get_task(name: str, data_dir: str | os.PathLike | None = None, **options: Any) -> Task:
    """Build a task by name. `options` go to the task's constructor (e.g. arithmetic's `max_digits`, `seed`)."""
    module_name, cls_name = _REGISTRY[canonical_name(name)].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    valid = [p for p in inspect.signature(cls).parameters if p != "data_dir"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"task {cls.name!r} has no option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(valid) or '(none)'}")
    return cls(data_dir=data_dir, **options)


__all__ = ["EOT", "SPLITS", "REPO", "ORIGINAL_LOOP_PRESET", "Example", "Task", "TaskBase", "DataFormatError", "get_task", "task_names",
           "canonical_name", "resolve_data_dir", "model_part"]
