"""StarRun's fine-tuning options, with a fake backend (no JAX): where each fine-tune starts (--finetune_from) and the
examples replayed into every fine-tune (--replay_file / --replay_n)."""
import json

import pytest

from star.loop import StarOptions, StarRun
from star.tasks import get_task


class FakeBackend:
    """Answers every question with the reference scratchpad; a fine-tune returns a new token naming its start."""

    def __init__(self, task):
        self.task, self.starts, self.packed, self.init_ckpts = task, [], [], []

    def base_params(self):
        return "base"

    def load_params(self, ckpt_dir):
        return open(f"{ckpt_dir}/params.txt").read()

    def generate_fn(self, params):
        by_prompt = {}
        for ex in self.task.load("train") + self.task.load("dev"):
            by_prompt[self.task.format_question(ex)] = self.task.reference_completion(ex)

        def generate(prompts, shared_prefix, max_new_tokens, stop):
            return [by_prompt[p] for p in prompts]
        return generate

    def pack(self, pairs_path, out_dir):
        with open(pairs_path) as f:
            self.packed.append([json.loads(line) for line in f])
        return out_dir + "/train.index"

    def finetune(self, start, index_path, steps, ckpt_dir, desc="train", on_step=None, **extra):
        import os
        self.starts.append(start)
        if "init_ckpt" in extra:
            self.init_ckpts.append(extra["init_ckpt"] and os.path.relpath(extra["init_ckpt"], os.path.dirname(
                os.path.dirname(ckpt_dir))))
        os.makedirs(ckpt_dir, exist_ok=True)
        made = f"{start}+{len(self.starts)}"
        with open(f"{ckpt_dir}/params.txt", "w") as f:
            f.write(made)
        return made


def _run(tmp_path, **options):
    task = get_task("arithmetic", min_digits=1, max_digits=2, n_train=20, n_dev=4, n_exemplars=0)
    opts = StarOptions(out_dir=str(tmp_path / "run"), n_iters=3, n_train_samples=6, eval_batch_size=4,
                       progress=False, steady_grow=True, start_steps=2, add_steps=0, **options)
    backend = FakeBackend(task)
    StarRun(opts, task, backend).run()
    return backend


def test_finetune_from_base_is_the_original(tmp_path):
    assert _run(tmp_path).starts == ["base", "base", "base"]


def test_finetune_from_previous_chains_the_iterations(tmp_path):
    assert _run(tmp_path, finetune_from="previous").starts == ["base", "base+1", "base+1+2"]


def test_finetune_from_previous_resumes_from_the_saved_model(tmp_path):
    _run(tmp_path, finetune_from="previous")
    results = tmp_path / "run" / "results.json"
    rows = json.loads(results.read_text())
    results.write_text(json.dumps([r for r in rows if r["iteration"] < 3]))  # iteration 3 "was killed"
    backend = _run(tmp_path, finetune_from="previous")
    assert backend.starts == ["base+1+2"]  # iteration 2's saved model, not the base


def test_carry_optimizer_passes_the_previous_checkpoint(tmp_path):
    backend = _run(tmp_path, finetune_from="previous", carry_optimizer=True)
    assert backend.init_ckpts == [None, "iter_01/ckpt", "iter_02/ckpt"]  # iteration 1 starts a fresh optimizer
    assert backend.starts == ["base", "base+1", "base+1+2"]
    assert _run(tmp_path / "plain", finetune_from="previous").init_ckpts == []  # off: the backend sees no init_ckpt


def test_replay_adds_examples_from_the_file_without_steps(tmp_path):
    replay = tmp_path / "table.jsonl"
    facts = [{"context": f"{x} + {y} , ", "completion": " ".join(str(x + y)) + "\n"}
             for x in range(3) for y in range(3)]
    replay.write_text("".join(json.dumps(f) + "\n" for f in facts))
    backend = _run(tmp_path, replay_file=str(replay), replay_n=5)
    for packed in backend.packed:
        assert len(packed) == 6 + 5  # every question answered right (6 kept) + 5 replayed
        assert all(p in facts for p in packed[6:]) and not any(p in facts for p in packed[:6])
    assert backend.packed[0][6:] != backend.packed[1][6:]  # drawn anew each iteration
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["train"]["kept"] for r in rows if r["iteration"] > 0] == [6, 6, 6]  # replay is not "kept"
    again = _run(tmp_path / "again", replay_file=str(replay), replay_n=5)
    assert again.packed == backend.packed  # seeded: the same draw on a rerun
    copied = _run(tmp_path / "copy", replay_file=str(replay), replay_n=5, copy_n=2)
    assert copied.packed[1][:2] == copied.packed[0][4:6]  # copy_n copies kept examples, not the replayed ones


@pytest.mark.parametrize("options, message", [
    (dict(replay_n=3), "needs a replay_file"),
    (dict(replay_file="/nonexistent/table.jsonl", replay_n=3), "/nonexistent/table.jsonl does not exist"),
    (dict(finetune_from="last"), "must be 'base' or 'previous'"),
    (dict(carry_optimizer=True), "needs finetune_from='previous'"),
])
def test_bad_options_fail_before_any_work(tmp_path, options, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _run(tmp_path, **options)
    assert not (tmp_path / "run" / "iter_00").exists()


@pytest.mark.parametrize("text, message", [
    ('{"context": "a"}\n', "line 1: expected a JSON object"),
    ('{"context": "a", "completion": "b"}\nnot json\n', "line 2: expected a JSON object"),
    ('{"context": "a", "completion": 3}\n', "line 1: .* must be strings"),
    ("\n", "has no examples"),
])
def test_bad_replay_file_names_the_line(tmp_path, text, message):
    replay = tmp_path / "bad.jsonl"
    replay.write_text(text)
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, replay_file=str(replay), replay_n=2)
    assert not (tmp_path / "run" / "iter_00").exists()  # before any work


def test_demo_defaults_replay_the_bases_own_pretraining_data(tmp_path):
    import iteration_train
    from cli_helpers import REPO
    demo = iteration_train.parse_args([])
    assert demo.finetune_from == "previous" and demo.replay_n == 300
    assert demo.replay_file == str(REPO / "assets" / "arithmetic_base" / "pretrain_pairs.jsonl")
    other = iteration_train.parse_args(["--base_model_location", str(tmp_path)])  # a base without pretrain_pairs
    assert other.replay_file is None and other.replay_n == 0
    (tmp_path / "pretrain_pairs.jsonl").write_text('{"context": "1 + 1 , ", "completion": "2\\n"}\n')
    assert iteration_train.parse_args(["--base_model_location", str(tmp_path)]).replay_file == \
        str(tmp_path / "pretrain_pairs.jsonl")
    cqa = iteration_train.parse_args(["--task", "cqa"])
    assert cqa.finetune_from == "base" and cqa.replay_n == 0 and cqa.replay_file is None  # the original's
    assert demo.anneal_each_finetune is True and cqa.anneal_each_finetune is False


def test_demo_trains_on_two_digit_sums_and_up():
    """The demo asks no 1-digit training questions (the base knows all 81 sums); --train_digits overrides, and a digit
    count outside --min_digits..--max_digits is refused by name."""
    import iteration_train
    assert iteration_train.parse_args([]).train_digits == "2,3"
    assert iteration_train.parse_args(["--max_digits", "5"]).train_digits == "2,3,4,5"
    assert iteration_train.parse_args(["--train_digits", "all"]).train_digits is None
    assert iteration_train.parse_args(["--min_digits", "2"]).train_digits is None  # no 1-digit sums to leave out
    assert iteration_train.parse_args(["--train_digits", "1,2"]).train_digits == "1,2"
    with pytest.raises(SystemExit):
        iteration_train.parse_args(["--train_digits", "4"])


def test_folder_flags_take_hyphens_or_underscores():
    """The original's flags use underscores, mtj's hyphens; the folder flags accept both spellings."""
    import iteration_train
    for flag in ("--out-dir", "--out_dir"):
        assert iteration_train.parse_args([flag, "/tmp/run"]).out_dir == "/tmp/run"
    for flag in ("--data-dir", "--data_dir"):
        assert iteration_train.parse_args([flag, "/tmp/data"]).data_dir == "/tmp/data"
