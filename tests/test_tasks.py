"""STaR tasks: formats byte-exact with the original prompt files, loaders, parsing, the arithmetic generator, errors."""
import re

import pytest

from star.tasks import EOT, DataFormatError, Example, Task, get_task, model_part, task_names
from star.tasks.arithmetic import operands, scratchpad

NYE_EXAMPLE = ("Input:\n9 6 4 + 4 9 4\nTarget:\n<scratch>\n9 6 4 + 4 9 4 , C: 0\n6 + 9 , 8 C: 0\n9 + 4 , 5 8 C: 1\n"
               ", 4 5 8 C: 1\n1 4 5 8\n</scratch>\n1 4 5 8\n")


@pytest.fixture(scope="module")
def star_dir(shared_data):
    return shared_data / "star"


@pytest.fixture(scope="module")
def cqa(star_dir):
    return get_task("commonsenseqa", data_dir=star_dir)


@pytest.fixture(scope="module")
def gsm(star_dir):
    return get_task("gsm8k", data_dir=star_dir)


@pytest.fixture(scope="module")
def arith():
    return get_task("arithmetic", max_digits=4, n_train=400, n_dev=60, n_exemplars=6, seed=3)


def exemplars(path):
    return path.read_text().strip("\n").split("\n\n")


# -- registry ----------------------------------------------------------------------------------------------------------
def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown task 'svamp'; valid tasks: arithmetic, commonsenseqa, gsm8k"):
        get_task("svamp")


def test_aliases_and_protocol(tmp_path):
    assert task_names() == ["arithmetic", "commonsenseqa", "gsm8k"]
    assert get_task("cqa", data_dir=tmp_path).name == "commonsenseqa"
    assert get_task("GSM", data_dir=tmp_path).name == "gsm8k"
    for name in task_names():
        assert isinstance(get_task(name, data_dir=tmp_path), Task)


def test_unknown_option_names_valid_ones():
    with pytest.raises(TypeError, match=r"no option\(s\) max_digit; valid options: min_digits, max_digits"):
        get_task("arithmetic", max_digit=3)


# -- errors for missing / broken files ------------------------------------------------------------------------------
def test_missing_prompt_file_names_path_and_flag(tmp_path):
    task = get_task("commonsenseqa", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"commonsenseqa/prompts_answer_key\.txt.*--data-dir") as err:
        task.few_shot_prompt(hint=True)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"gsm/prompts\.txt.*--data-dir"):
        get_task("gsm8k", data_dir=tmp_path).few_shot_prompt()
    with pytest.raises(FileNotFoundError, match=r"gsm/train_rand_split\.jsonl.*--data-dir"):
        get_task("gsm8k", data_dir=tmp_path).load("train")


@pytest.mark.parametrize("name, folder", [("commonsenseqa", "commonsenseqa"), ("gsm8k", "gsm")])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, star_dir, name, folder):
    lines = (star_dir / folder / "dev_rand_split.jsonl").read_text().splitlines()[:3]
    (tmp_path / folder).mkdir()
    bad = tmp_path / folder / "dev_rand_split.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"question": "broken', lines[2]]) + "\n")
    task = get_task(name, data_dir=tmp_path)
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}:3: malformed JSON line")):
        task.load("dev")
    bad.write_text("\n".join(lines[:2] + ['{"id": "x"}']) + "\n")           # valid JSON, wrong fields
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}:3: not a")):
        task.load("dev")
    bad.write_text("\n".join(lines) + "\n")
    assert len(task.load("dev")) == 3


def test_unknown_split(cqa):
    with pytest.raises(ValueError, match="valid splits: train, dev"):
        cqa.load("test")


# -- CommonsenseQA ----------------------------------------------------------------------------------------------------
def test_cqa_counts_and_fields(cqa):
    train, dev = cqa.load("train"), cqa.load("dev")
    assert (len(train), len(dev)) == (9741, 1221)
    ex = train[0]
    assert ex.id == "075e483d21c29a511267ef62bedc0461" and ex.gold == "a"
    assert cqa.format_question(ex) == (
        "Q: The sanctions against the school were a punishing blow, and they seemed to what the efforts the school "
        "had made to change?\nAnswer Choices:\n(a) ignore\n(b) enforce\n(c) authoritarian\n(d) yell at\n(e) avoid\nA:")
    assert cqa.format_question(ex, hint=True).split("\n")[2] == "(a) ignore (CORRECT)"
    assert {cqa.answer_classes(e) for e in dev} == {"all"}


def _cqa_example_from_exemplar(text: str) -> Example:
    """Rebuild an Example from an answer-key exemplar (gold from the (CORRECT) marker)."""
    question = text.split("\nA:")[0].split("\n")
    choices, gold = [], None
    for line in question[2:]:
        label, choice = re.fullmatch(r"\((\w)\) (.*)", line).groups()
        if choice.endswith(" (CORRECT)"):
            choice, gold = choice[:-len(" (CORRECT)")], label
        choices.append((label, choice))
    return Example(id="x", question=question[0][len("Q: "):], gold=gold, meta={"choices": choices})


@pytest.mark.parametrize("direct", [False, True])
def test_cqa_every_exemplar_parses_to_its_gold(cqa, star_dir, direct):
    suffix = "_direct" if direct else ""
    plain = exemplars(star_dir / "commonsenseqa" / f"prompts{suffix}.txt")
    keyed = exemplars(star_dir / "commonsenseqa" / f"prompts{suffix}_answer_key.txt")
    assert len(plain) == len(keyed) == 7
    for p, k in zip(plain, keyed):
        assert k.count(" (CORRECT)") == 1 and "(CORRECT)" not in p
        ex = _cqa_example_from_exemplar(k)
        completion = model_part(p, "\nA:")
        assert cqa.parse_answer(completion) == ex.gold
        assert cqa.is_correct(cqa.parse_answer(completion), ex)
        # our question format reproduces the exemplar's question, hinted and not, byte for byte
        assert p == cqa.format_question(ex) + completion
        assert k == cqa.format_question(ex, hint=True) + completion
        if direct:
            assert completion == cqa.direct_completion(ex)
    prompt = cqa.few_shot_prompt(hint=True, direct=direct)
    assert prompt == "\n\n".join(keyed) + "\n\n" and prompt.count(" (CORRECT)") == 7
    assert cqa.few_shot_prompt(direct=direct) == "\n\n".join(plain) + "\n\n"


def test_cqa_parse_first_line_only(cqa):
    ex = Example("x", "q", "e", {"choices": [(c, c) for c in "abcde"]})
    assert cqa.parse_answer(" Blotters absorb ink. Therefore, the answer is blotter (e).\n\nQ: next (a).") == "e"
    assert cqa.parse_answer(" Therefore, the answer is blotter (E).  " + EOT + "junk") == "e"
    assert cqa.parse_answer(" Therefore, the answer is\nblotter (e).") is None     # not on the first line
    assert cqa.parse_answer(" Therefore, the answer is blotter (e)") is None      # needs the final `(x).`
    assert cqa.truncate(" a (b).\nQ: more") == " a (b)."
    assert cqa.is_done(" a (b).\n") and not cqa.is_done(" a (b).")
    assert cqa.is_correct("e", ex) and not cqa.is_correct("a", ex) and not cqa.is_correct(None, ex)
    assert cqa.stop == ("\n",) and cqa.default_gen_length == 96
    assert cqa.context(ex).startswith(cqa.few_shot_prompt()) and cqa.context(ex).endswith("\nA:")


# -- GSM8K ------------------------------------------------------------------------------------------------------------
def test_gsm_counts_and_fields(gsm):
    train, dev = gsm.load("train"), gsm.load("dev")
    assert (len(train), len(dev)) == (7473, 1319)
    assert train[0].gold == "72" and train[0].question.startswith("Natalia sold clips")
    assert sum("," in ex.gold for ex in train) > 0                    # the original kept commas in golds
    assert len({ex.id for ex in train}) == len(train)


def test_gsm_every_exemplar_parses_to_its_gold(gsm, star_dir):
    plain = exemplars(star_dir / "gsm" / "prompts.txt")
    keyed = exemplars(star_dir / "gsm" / "prompts_answer_key.txt")
    assert len(plain) == len(keyed) == 6
    for p, k in zip(plain, keyed):
        completion = model_part(p, "\nA:")
        gold = re.search(r"\n#### (.*)$", p).group(1)
        question = p.split("\nA:")[0][len("Q: "):]
        ex = Example("x", question, gold, {})
        assert gsm.parse_answer(completion) == gold and gsm.is_correct(gold, ex)
        assert p == gsm.format_question(ex) + completion
        assert k == gsm.format_question(ex, hint=True) + completion     # hint ` (N)` right after the question
        assert k.split("\nA:")[0].endswith(f" ({gold})")
    assert gsm.few_shot_prompt() == "\n\n".join(plain) + "\n\n"
    assert gsm.few_shot_prompt(hint=True) == "\n\n".join(keyed) + "\n\n"
    direct = gsm.few_shot_prompt(direct=True)
    assert direct.startswith("Q: Natalia") and "\nA: #### 72\n\nQ: Betty" in direct and "<<" not in direct


def test_gsm_train_example_matches_exemplar(gsm, star_dir):
    keyed = exemplars(star_dir / "gsm" / "prompts_answer_key.txt")
    ex = gsm.load("train")[0]
    assert keyed[0] == gsm.format_question(ex, hint=True) + " " + ex.meta["solution"]


def test_gsm_parse_truncate_and_compare(gsm):
    completion = " 2 + 3 = <<2+3=5>>5 apples.\n#### 5\n\nQ: another #### 7"
    assert gsm.truncate(completion) == " 2 + 3 = <<2+3=5>>5 apples.\n#### 5"
    assert gsm.parse_answer(completion) == "5"
    assert gsm.parse_answer(" so #### 12 " + EOT + "\n#### 3") == "12"
    assert gsm.parse_answer(" no answer here\n\nQ: x") is None and gsm.parse_answer(" ####  \n") is None
    assert gsm.is_done(completion) and not gsm.is_done(" 2 + 3 = 5\n#### 5")
    ex = Example("x", "q", "1,080", {})
    assert gsm.is_correct("1,080", ex) and not gsm.is_correct("1080", ex)
    assert get_task("gsm8k", ignore_commas=True).is_correct("1080", ex)
    assert gsm.parse_answer(gsm.direct_completion(ex)) == "1,080"
    assert gsm.format_question(ex, hint=True) == "Q: q (1,080)\nA:"


# -- arithmetic -------------------------------------------------------------------------------------------------------
def test_arithmetic_nye_example_byte_for_byte(arith):
    ex = Example("x", "9 6 4 + 4 9 4", "1 4 5 8", {"a": 964, "b": 494, "digits": 3})
    assert arith.format_question(ex) + arith.reference_completion(ex) == NYE_EXAMPLE
    assert "Input:\n9 6 4 + 4 9 4\nTarget:\n" + scratchpad(964, 494) == NYE_EXAMPLE
    assert arith.format_question(ex, hint=True) == "Input:\n9 6 4 + 4 9 4\nTarget: 1 4 5 8\n"
    assert arith.parse_answer(arith.reference_completion(ex)) == "1 4 5 8"
    assert arith.direct_completion(ex) == "1 4 5 8\n"
    assert operands(NYE_EXAMPLE) == (964, 494) and arith.answer_classes(ex) == "3"


def test_arithmetic_scratchpad_shapes():
    # Nye et al.'s figure: no final carry keeps the leading 0 in the scratchpad's sum line, not in the answer
    assert scratchpad(29, 57) == "<scratch>\n2 9 + 5 7 , C: 0\n2 + 5 , 6 C: 1\n, 8 6 C: 0\n0 8 6\n</scratch>\n8 6\n"
    assert scratchpad(5, 3) == "<scratch>\n5 + 3 , C: 0\n, 8 C: 0\n0 8\n</scratch>\n8\n"
    assert scratchpad(99999, 99999).endswith(", 9 9 9 9 8 C: 1\n1 9 9 9 9 8\n</scratch>\n1 9 9 9 9 8\n")
    with pytest.raises(ValueError, match="same digit count"):
        scratchpad(12, 3)


def test_arithmetic_splits_disjoint_deterministic(arith):
    train, dev, shots = arith.load("train"), arith.load("dev"), arith.exemplars()
    pair = lambda ex: (ex.meta["a"], ex.meta["b"])                                  # noqa: E731
    train_pairs, dev_pairs, shot_pairs = {pair(e) for e in train}, {pair(e) for e in dev}, {pair(e) for e in shots}
    assert not train_pairs & dev_pairs and not shot_pairs & (train_pairs | dev_pairs)
    assert len(dev_pairs) == len(dev) and len(shots) == 6
    assert len(train) == 4 * 400
    # 1 digit has 81 problems: dev takes at most half of what the exemplars leave, train samples the rest
    assert sum(e.meta["digits"] == 1 for e in dev) == (81 - 2) // 2
    assert [sum(e.meta["digits"] == k for e in dev) for k in (2, 3, 4)] == [60, 60, 60]
    assert len({e.id for e in train}) == len(train)
    for ex in train[::37] + dev[::11]:
        a, b, k = ex.meta["a"], ex.meta["b"], ex.meta["digits"]
        assert len(str(a)) == len(str(b)) == k and ex.gold == " ".join(str(a + b))
        assert ex.question == f"{' '.join(str(a))} + {' '.join(str(b))}"
        assert arith.is_correct(arith.parse_answer(arith.reference_completion(ex)), ex)
    again = get_task("arithmetic", max_digits=4, n_train=400, n_dev=60, n_exemplars=6, seed=3)
    assert again.load("dev") == dev and again.load("train") == train and again.exemplars() == shots
    other = get_task("arithmetic", max_digits=4, n_train=400, n_dev=60, n_exemplars=6, seed=4)
    assert other.load("dev") != dev


def test_arithmetic_default_sizes():
    task = get_task("arithmetic")
    train, dev = task.load("train"), task.load("dev")
    assert len(train) == 50_000 and {task.answer_classes(e) for e in train} == {"1", "2", "3", "4", "5"}
    assert not {(e.meta["a"], e.meta["b"]) for e in train} & {(e.meta["a"], e.meta["b"]) for e in dev}
    assert task.default_gen_length >= len(scratchpad(99999, 99999))


def test_arithmetic_few_shot_prompt(arith):
    prompt = arith.few_shot_prompt()
    shots = prompt[:-2].split("\n\n")
    assert prompt.endswith("\n\n") and len(shots) == 6
    for text, ex in zip(shots, arith.exemplars()):
        assert text + "\n" == arith.format_question(ex) + arith.reference_completion(ex)
        assert arith.parse_answer(model_part(text, "Target:\n") + "\n") == ex.gold
    hinted = arith.few_shot_prompt(hint=True)
    assert hinted.count("Target: ") == 6 and "Target:\n" not in hinted
    direct = arith.few_shot_prompt(direct=True)
    assert "<scratch>" not in direct and direct.count("Target:\n") == 6
    assert get_task("arithmetic", n_exemplars=0, n_train=5, n_dev=5).few_shot_prompt() == ""


def test_arithmetic_parse_truncate_done(arith):
    ex = Example("x", "9 6 4 + 4 9 4", "1 4 5 8", {"a": 964, "b": 494, "digits": 3})
    ref = arith.reference_completion(ex)
    generated = ref + "\nInput:\n1 + 2\nTarget:\n"
    assert arith.truncate(generated) == ref and arith.truncate(ref + EOT + "x") == ref
    assert arith.parse_answer(generated) == "1 4 5 8"
    assert arith.is_done(generated) and not arith.is_done(ref[:-1]) and not arith.is_done(ref[:40])
    assert arith.parse_answer(ref[:40]) is None                                   # unfinished scratchpad
    assert arith.parse_answer("1 4 5 8\n\nInput:") == "1 4 5 8"                    # direct
    assert arith.is_done("1 4 5 8\n") and not arith.is_done("1 4 5")
    assert arith.is_correct("1458", ex) and not arith.is_correct("1 4 5 9", ex) and not arith.is_correct(None, ex)
    assert arith.stop == ("\n\n",)
