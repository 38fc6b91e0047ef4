"""GSM8K (Cobbe et al. 2021) in the format of the original STaR code (`device_inference.py`, `gsm/prompts*.txt`).

Question: `Q: {question}\\nA:`; with the hint (rationalization) `Q: {question} ({answer})\\nA:`, the final answer in
parentheses right after the question, as `gsm/prompts_answer_key.txt` shows. (The released `question_to_context`
pasted the whole `answer` field there, i.e. the full reference solution; that leaks the rationale and contradicts the
hinted prompt file, so we follow the prompt file.)

Completion: the rationale lines (with `<<expr=value>>` calculator annotations as in the data), ending with a line
`#### N`. The answer is the text after `####` on the first line that contains it; correct iff it equals the gold (the
text after `#### ` in the data) ignoring case, as the original compared `pred.lower() == gold.lower()`. Commas are NOT
removed (the original did not; 95 train golds such as `1,080` carry them); `ignore_commas=True` drops them on both
sides. Direct format (no original prompt file: `gsm/prompts_direct_answer_key.txt` holds CommonsenseQA exemplars):
` #### N`, with exemplars derived from `prompts.txt`.
"""
from __future__ import annotations

import re

from star.tasks import EOT, ORIGINAL_LOOP_PRESET, DataFormatError, Example, TaskBase, model_part

_DONE = re.compile(r"####[^\n]*\n")


class GSM8K(TaskBase):
    name = "gsm8k"
    folder = "gsm"
    stop = ("\n\n", "\nQ:")    # the next exemplar would start; the kept text ends at the `#### N` line (truncate)
    default_gen_length = 256   # reference solutions: median 86, 99th percentile 224, max 342 GPT-2 tokens
    # iteration_train.py's defaults for this task: the original script's
    loop_preset = dict(ORIGINAL_LOOP_PRESET, out_dir="runs/star_gsm8k", gen_length=256)

    def __init__(self, data_dir=None, ignore_commas: bool = False):
        super().__init__(data_dir)
        self.ignore_commas = ignore_commas

    def load(self, split: str) -> list[Example]:
        self.check_split(split)
        filename = f"{split}_rand_split.jsonl"
        examples = []
        for lineno, row in self.read_jsonl(filename):
            question, solution = row.get("question"), row.get("answer")
            if not isinstance(question, str) or not isinstance(solution, str) or "#### " not in solution:
                raise DataFormatError(f"{self.path(filename)}:{lineno}: not a GSM8K row (needs string fields "
                                      f"'question' and 'answer', the answer ending in '#### N')")
            gold = solution.split("#### ")[-1].strip()
            examples.append(Example(id=f"{split}-{len(examples)}", question=question, gold=gold,
                                    meta={"solution": solution}))
        return examples

    def format_question(self, ex: Example, hint: bool = False) -> str:
        return f"Q: {ex.question}" + (f" ({ex.gold})" if hint else "") + "\nA:"

    def few_shot_prompt(self, hint: bool = False, direct: bool = False) -> str:
        exemplars = self.read_prompt_file("prompts_answer_key.txt" if hint else "prompts.txt")
        if direct:
            exemplars = [ex.split("\nA:", 1)[0] + "\nA:" + self._direct(self.parse_answer(model_part(ex, "\nA:")))
                         for ex in exemplars]
        return "\n\n".join(exemplars) + "\n\n"

    def truncate(self, completion: str) -> str:
        text = completion.split(EOT)[0]
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if "####" in line:
                return "\n".join(lines[:i + 1])
        return text.split("\n\n")[0]

    def is_done(self, completion: str) -> bool:
        return EOT in completion or _DONE.search(completion) is not None

    def parse_answer(self, completion: str) -> str | None:
        for line in self.truncate(completion).split("\n"):
            if "####" in line:
                return line.split("####")[-1].strip() or None
        return None

    def is_correct(self, pred: str | None, ex: Example) -> bool:
        if pred is None:
            return False
        pred, gold = pred.strip().lower(), ex.gold.strip().lower()
        if self.ignore_commas:
            pred, gold = pred.replace(",", ""), gold.replace(",", "")
        return pred == gold

    @staticmethod
    def _direct(answer: str | None) -> str:
        return f" #### {answer}"

    def direct_completion(self, ex: Example) -> str:
        return self._direct(ex.gold)
