"""CommonsenseQA (Talmor et al. 2019) in the format of the original STaR code (`device_inference.py`).

Question (labels printed lower-case; hint = ` (CORRECT)` after the right choice, used with prompts_answer_key.txt):

    Q: What do people use to absorb extra ink from a fountain pen?
    Answer Choices:
    (a) shirt pocket
    ...
    (e) blotter (CORRECT)
    A:

Completion: ONE line, ` <rationale> Therefore, the answer is blotter (e).` (direct: ` (e).`). The original kept only
the first generated line (cut at `<|endoftext|>`) and read the answer as the character `line[-3]`, i.e. the letter of a
final `(x).`; we read the same letter with a regex that also tolerates trailing spaces, and give None (never correct)
where the line does not end in `(x).`.
"""
from __future__ import annotations

import re

from star.tasks import EOT, ORIGINAL_LOOP_PRESET, DataFormatError, Example, TaskBase

_FINAL_CHOICE = re.compile(r"\(([A-Za-z])\)\.\s*$")


class CommonsenseQA(TaskBase):
    name = "commonsenseqa"
    folder = "commonsenseqa"
    stop = ("\n",)             # only the first line is kept and parsed
    default_gen_length = 96    # the original --gen_length
    # iteration_train.py's defaults for this task: the original script's
    loop_preset = dict(ORIGINAL_LOOP_PRESET, out_dir="runs/star_commonsenseqa", gen_length=96)
    prompt_files = {           # (hint, direct) -> file
        (False, False): "prompts.txt",
        (True, False): "prompts_answer_key.txt",
        (False, True): "prompts_direct.txt",
        (True, True): "prompts_direct_answer_key.txt",
    }

    def load(self, split: str) -> list[Example]:
        self.check_split(split)
        filename = f"{split}_rand_split.jsonl"
        examples = []
        for lineno, row in self.read_jsonl(filename):
            try:
                q = row["question"]
                choices = [(c["label"].lower(), c["text"]) for c in q["choices"]]
                ex = Example(id=str(row["id"]), question=q["stem"], gold=row["answerKey"].strip().lower(),
                             meta={"choices": choices, "concept": q.get("question_concept")})
            except (KeyError, TypeError, AttributeError) as err:
                raise DataFormatError(f"{self.path(filename)}:{lineno}: not a CommonsenseQA row "
                                      f"(missing or bad field {err})") from None
            if ex.gold not in {label for label, _ in choices}:
                raise DataFormatError(f"{self.path(filename)}:{lineno}: answerKey {ex.gold!r} is not a choice label")
            examples.append(ex)
        return examples

    def format_question(self, ex: Example, hint: bool = False) -> str:
        lines = [f"Q: {ex.question}", "Answer Choices:"]
        for label, text in ex.meta["choices"]:
            lines.append(f"({label}) {text}" + (" (CORRECT)" if hint and label == ex.gold else ""))
        return "\n".join(lines) + "\nA:"

    def few_shot_prompt(self, hint: bool = False, direct: bool = False) -> str:
        return "\n\n".join(self.read_prompt_file(self.prompt_files[(bool(hint), bool(direct))])) + "\n\n"

    def truncate(self, completion: str) -> str:
        return completion.split(EOT)[0].split("\n")[0]

    def is_done(self, completion: str) -> bool:
        return "\n" in completion or EOT in completion

    def parse_answer(self, completion: str) -> str | None:
        m = _FINAL_CHOICE.search(self.truncate(completion))
        return m.group(1).lower() if m else None

    def direct_completion(self, ex: Example) -> str:
        return f" ({ex.gold})."
