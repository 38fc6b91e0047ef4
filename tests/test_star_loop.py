"""The STaR outer loop (star/loop.py, iteration_train.py) end to end on a tiny GPT-J, on the CPU, with real files.

- step schedules: exponential (40, 48, 57, ... 7912 at iteration 30), steady (start + add*(n-1)), epoch mode, the
  --max-steps cap;
- a 2-iteration arithmetic run whose training set is not empty: an "oracle" wraps the real JaxBackend's generation on
  the TRAINING questions and answers half of them (and some hinted retries) with the reference scratchpad, so that
  packing, fine-tuning and evaluation run for real; the experiment folder is complete;
- a 2-iteration run on a slice of the real CommonsenseQA files with a random model: nothing is kept, both iterations
  are skipped with a message, the run completes and reports;
- the arithmetic run SIGKILLed during generation, during training and during evaluation (test hook
  STAR_TEST_KILL_AT, read by the test driver's StarRun hooks), rerun with the same command: rationales, training text, eval answers, metrics,
  training losses and the fine-tuned weights equal the uninterrupted run's;
- bad inputs: a malformed JSONL line, a missing prompt file, an unknown --task, a prompt longer than seq.

The CLI runs are subprocesses with ONE CPU device (a Trainer mesh uses every device, and conftest.py makes 8) and a
shared persistent compilation cache, so each compiles its train step and sampler once per session.
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
import signal

import numpy as np
import pytest

from cli_helpers import REPO, TINY, check_ok, cli_env, error_line, read_metrics, run_cli, write_config
from star.loop import StarOptions, n_steps

# --------------------------------------------------------------------------------------------------------------
# 1. step schedules
# --------------------------------------------------------------------------------------------------------------


def test_exponential_schedule_is_the_papers():
    opts = StarOptions(exponential_grow=True, start_steps=40, grow_steps=1.2)
    assert [n_steps(opts, n, 0) for n in range(1, 7)] == [40, 48, 57, 69, 82, 99]
    assert n_steps(opts, 30, 0) == 7912  # the GSM8K cap of the paper
    assert n_steps(opts, 30, 123456) == 7912  # the example count does not matter


def test_steady_schedule():
    opts = StarOptions(steady_grow=True, start_steps=300, add_steps=20)  # arithmetic: 300 + 20 (n - 1)
    assert [n_steps(opts, n, 0) for n in (1, 2, 3, 16)] == [300, 320, 340, 600]


def test_epoch_schedule():
    opts = StarOptions(base_epochs=1.0, add_epochs=0.2, gradient_accumulation_steps=8, sequence_count=10)
    for n, kept in [(1, 800), (2, 800), (3, 1234), (5, 79), (1, 0)]:
        expected = int(kept * (1.0 + 0.2 * (n - 1)) // (8 * 10))
        assert n_steps(opts, n, kept) == expected
    assert n_steps(opts, 1, 800) == 10 and n_steps(opts, 2, 800) == 12 and n_steps(opts, 1, 79) == 0


def test_max_steps_caps_every_mode():
    for mode in (dict(exponential_grow=True), dict(steady_grow=True), {}):
        opts = StarOptions(**mode, start_steps=40, add_steps=20, max_steps=45, gradient_accumulation_steps=1,
                           sequence_count=1)
        assert n_steps(opts, 1, 40) == 40  # under the cap
        assert n_steps(opts, 30, 10_000) == 45
    assert n_steps(StarOptions(exponential_grow=True, max_steps=7912), 40, 0) == 7912


# --------------------------------------------------------------------------------------------------------------
# shared set-up: a tiny config, a random base checkpoint, the oracle driver, a CQA slice
# --------------------------------------------------------------------------------------------------------------
TRAIN_KEYS = dict(cores_per_replica=1, per_replica_batch=4, gradient_accumulation_steps=1, warmup_steps=2,
                  anneal_steps=10, lr=1e-3, end_lr=1e-4, weight_decay=0.0, total_steps=10, ckpt_every=2,
                  name="star_tiny")
ARITH_SEQ, CQA_SEQ = 256, 1024
N_ITERS = 2
# 2 iterations of steady_grow 4 + 2 (n - 1) steps; 8 train questions (4 of each digit count) in chunks of 4;
# 8 dev questions; rationalization on (the arithmetic default), hinted examples saved without the hint
ARITH_ARGS = ["--task", "arithmetic", "--max_digits", "2", "--n_dev_per_digit", "4", "--n_train_samples", "8",
              "--n_iters", str(N_ITERS), "--gen_length", "40", "--eval_batch_size", "4", "--steady_grow",
              "--start_steps", "4", "--add_steps", "2", "--p_show_hint_save", "0", "--train_digits", "all",
              "--no-progress"]

# Answers half of the training questions (a + b even) and a third of the hinted retries with the reference
# scratchpad; every other answer, and every dev answer, is the real model's.
ORACLE_DRIVER = '''"""iteration_train.py with an oracle on the training questions (tests/test_star_loop.py)."""
import logging
import os
import signal
import sys

sys.path.insert(0, {repo!r})
import iteration_train
from mesh_transformer.cli_util import run_main
from star import loop
from star.tasks.arithmetic import operands, scratchpad


def oracle(real):
    def generate(prompts, shared_prefix, max_new_tokens, stop):
        out = list(real(prompts, shared_prefix, max_new_tokens, stop))
        for i, prompt in enumerate(prompts):
            a, b = operands(prompt)
            hinted = not prompt.endswith("Target:\\n")
            if (a + b) % (3 if hinted else 2) == 0:
                out[i] = scratchpad(a, b)
        return out
    return generate


_generate = loop.StarRun.generate


def generate(self, n, params):
    backend = self.backend
    real = type(backend).generate_fn
    backend.generate_fn = lambda p: oracle(real(backend, p))
    try:
        return _generate(self, n, params)
    finally:
        del backend.generate_fn


loop.StarRun.generate = generate

# STAR_TEST_KILL_AT="generate" | "train" | "eval", optionally ":N" for iteration N (default 1): SIGKILL right after
# the first chunk of that iteration's rationales (generate) or dev answers (eval) is on disk, or at the first training
# step after a checkpoint of that iteration was committed (train), through StarRun's hooks.
_want, _, _at = os.environ.get("STAR_TEST_KILL_AT", "").partition(":")


def _kill():
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def on_chunk(self, stage, n):
    if stage == _want and n == int(_at or 1):
        _kill()


def on_train_step(self, n, step, ckpt_dir):
    if _want == "train" and n == int(_at or 1) and os.path.exists(os.path.join(ckpt_dir, "meta.json")):
        _kill()


loop.StarRun.on_chunk = on_chunk
loop.StarRun.on_train_step = on_train_step
sys.exit(run_main(iteration_train.main))
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Configs, a random base checkpoint (no compile: tests/helpers.random_params), the oracle driver and a cache."""
    from helpers import random_params
    from mesh_transformer import checkpoint as ckpt
    from mesh_transformer.config import load_config
    from mesh_transformer.model import CausalTransformer

    root = tmp_path_factory.mktemp("star_loop")
    arith_cfg = write_config(root / "arith.json", **{**TRAIN_KEYS, "seq": ARITH_SEQ})
    cqa_cfg = write_config(root / "cqa.json", **{**TRAIN_KEYS, "seq": CQA_SEQ})
    cfg = load_config(arith_cfg)
    params = random_params(CausalTransformer(cfg), seed=0, bias_scale=0.02)
    base = root / "base"
    ckpt.save_checkpoint(str(base), params, 0, cfg, shards=1)  # the same weights serve both seqs
    driver = root / "oracle_iteration_train.py"
    driver.write_text(ORACLE_DRIVER.format(repo=str(REPO)))
    return {"root": root, "arith_cfg": arith_cfg, "cqa_cfg": cqa_cfg, "base": str(base), "driver": driver,
            "cache": root / "xla_cache"}


def _env(work, **extra) -> dict:
    env = cli_env(1, work["cache"], **extra)
    if "STAR_TEST_KILL_AT" not in extra:
        env.pop("STAR_TEST_KILL_AT", None)
    return env


def _arith_run(work, out_dir: pathlib.Path, **env):
    args = [*ARITH_ARGS, "--config", work["arith_cfg"], "--base_model_location", work["base"], "--out-dir", out_dir]
    return run_cli(str(work["driver"]), args, _env(work, **env))


@pytest.fixture(scope="module")
def arith_ref(work) -> pathlib.Path:
    """The uninterrupted arithmetic run."""
    out = work["root"] / "arith_ref"
    check_ok(_arith_run(work, out))
    return out


def _lines(path: pathlib.Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_report(out: pathlib.Path, n_iters: int) -> list:
    rows = json.loads((out / "results.json").read_text())
    assert [r["iteration"] for r in rows] == list(range(n_iters + 1))
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + n_iters + 1, md  # header, separator, iterations 0..n
    assert [line.split("|")[1].strip() for line in table[2:]] == [str(n) for n in range(n_iters + 1)]
    png = out / "accuracy.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![accuracy per iteration](accuracy.png)" in md
    run_config = json.loads((out / "run_config.json").read_text())
    assert {"argv", "options", "model_config"} <= set(run_config)
    return rows


# --------------------------------------------------------------------------------------------------------------
# 2. end to end: arithmetic with a non-empty training set
# --------------------------------------------------------------------------------------------------------------
def test_arithmetic_run_fills_the_experiment_folder(arith_ref):
    out = arith_ref
    rows = _check_report(out, N_ITERS)
    assert rows[0]["steps"] == 0 and set(rows[0]["dev_accuracy"]) == {"1", "2", "all"}
    header = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| "))
    assert "train 1 %" in header and "train 2 %" in header and "dev 2 %" in header  # first try per digit count
    assert (out / "iter_00" / "eval.json").is_file() and len(_lines(out / "iter_00" / "eval.jsonl")) == 8
    for n in range(1, N_ITERS + 1):
        d = out / f"iter_{n:02d}"
        row = rows[n]
        assert row["complete"] and not row.get("skipped") and row["steps"] == 4 + 2 * (n - 1)
        records = _lines(d / "rationales.jsonl")
        first = [r for r in records if not r["rationalized"]]
        hinted = [r for r in records if r["rationalized"]]
        assert len(first) == 8 and len(hinted) == sum(not r["correct"] for r in first)  # p_rationalization 1
        gen = json.loads((d / "generation.json").read_text())
        assert gen == row["train"] and gen["n"] == 8
        by_class = {c: [r["correct"] for r in first if r["class"] == c] for c in ("1", "2")}
        assert gen["accuracy_by_class"] == {c: sum(v) / len(v) for c, v in by_class.items() if v}
        kept_first = sum(r["correct"] for r in first)
        kept_hinted = sum(r["correct"] for r in hinted)
        assert kept_first >= 1 and gen["kept"] == kept_first + kept_hinted and gen["rationalized"] == kept_hinted
        pairs = _lines(d / "train.jsonl")
        assert len(pairs) == gen["kept"]
        text = (d / "train.txt").read_text()
        assert text == "".join(p["context"] + p["completion"] + "<|endoftext|>" for p in pairs)
        for p in pairs:  # hint-less question + the scratchpad
            assert p["context"].startswith("Input:\n") and p["context"].endswith("\nTarget:\n")
            assert p["completion"].startswith("<scratch>\n") and "</scratch>\n" in p["completion"]
        index = d / "records" / "train.index"
        names = index.read_text().split()
        assert len(names) == 1 and names[0].endswith(".tfrecords") and (d / "records" / names[0]).is_file()
        meta = json.loads((d / "ckpt" / "meta.json").read_text())
        assert meta["step"] == row["steps"]
        losses = read_metrics(d / "ckpt" / "metrics.jsonl")
        assert [m["step"] for m in losses] == list(range(1, row["steps"] + 1))
        assert all(np.isfinite(m["loss"]) for m in losses)
        ev = json.loads((d / "eval.json").read_text())
        assert ev["n"] == 8 and ev["accuracy"] == row["dev_accuracy"]
        assert len(_lines(d / "eval.jsonl")) == 8
    # iteration 2 generated with M(1): its non-oracle answers come from the fine-tuned model, not the base
    assert (out / "iter_02" / "rationales.jsonl").read_text() != (out / "iter_01" / "rationales.jsonl").read_text()


def test_arithmetic_run_on_a_llama_hf_base(work):
    """The same 2-iteration run from a tiny random Llama (GQA) in an HF folder with its own tokenizer.json (a small
    byte-level BPE): `--hf FOLDER` instead of --base_model_location; the model's keys and tokenizer come from the
    folder, the training keys from --config; every iteration's fine-tune is committed as HF folders that
    transformers can load; the report and the plot are there."""
    from helpers import random_params, write_bpe_tokenizer
    from mesh_transformer.config import load_config
    from mesh_transformer.hf import save_hf
    from mesh_transformer.model import CausalTransformer
    from star.tasks.arithmetic import scratchpad

    folder = work["root"] / "llama_base"
    cfg = load_config(dict(model_type="llama", layers=2, d_model=64, n_heads=4, n_kv_heads=2, n_vocab=512, d_ff=128,
                           seq=ARITH_SEQ, compute_dtype="float32"))
    save_hf(cfg, random_params(CausalTransformer(cfg), seed=0, bias_scale=0.02), str(folder))
    pairs = ([(a, b) for a in range(10) for b in range(10)] +
             [(a, b) for a in range(10, 99, 3) for b in range(10, 99, 7)])
    write_bpe_tokenizer(folder, [f"Input:\n{a} + {b}\nTarget:\n{scratchpad(a, b)}" for a, b in pairs], vocab_size=400)
    keys = write_config(work["root"] / "llama_keys.json", **{**TRAIN_KEYS, "seq": ARITH_SEQ})  # + TINY's keys ...
    raw = json.loads(pathlib.Path(keys).read_text())
    raw.pop("tokenizer")  # ... but the tokenizer is the folder's
    pathlib.Path(keys).write_text(json.dumps(raw))
    out = work["root"] / "arith_llama"
    args = [*ARITH_ARGS, "--config", keys, "--hf", str(folder), "--out-dir", out]
    check_ok(run_cli(str(work["driver"]), args, _env(work)))
    rows = _check_report(out, N_ITERS)
    model = json.loads((out / "run_config.json").read_text())["model_config"]
    assert model["model_type"] == "llama" and model["n_kv_heads"] == 2 and model["seq"] == ARITH_SEQ
    assert model["tokenizer"] == str(folder)
    for n in range(1, N_ITERS + 1):
        row = rows[n]
        assert row["complete"] and row["steps"] == 4 + 2 * (n - 1) and row["train"]["kept"] >= 1
        step_dir = out / f"iter_{n:02d}" / "ckpt" / f"step_{row['steps']}"
        saved = json.loads((step_dir / "config.json").read_text())
        assert saved["model_type"] == "llama" and saved["num_key_value_heads"] == 2
        assert (step_dir / "model.safetensors").is_file()
    assert (out / "iter_02" / "rationales.jsonl").read_text() != (out / "iter_01" / "rationales.jsonl").read_text()


# --------------------------------------------------------------------------------------------------------------
# 2 + 4. a slice of the real CommonsenseQA; a random model keeps nothing: iterations skipped, run completes
# --------------------------------------------------------------------------------------------------------------
def _cqa_slice(shared_data: pathlib.Path, folder: pathlib.Path, n_train: int = 8, n_dev: int = 8,
               n_exemplars: int = 2) -> pathlib.Path:
    """{folder}/commonsenseqa/ with the first lines of the real train/dev files and the real prompt files cut to
    their first n_exemplars exemplars (so the few-shot prompt fits a small seq)."""
    src = shared_data / "star" / "commonsenseqa"
    dst = folder / "commonsenseqa"
    dst.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        with open(src / f"{split}_rand_split.jsonl") as f:
            (dst / f"{split}_rand_split.jsonl").write_text("".join(next(f) for _ in range(n)))
    for prompt in src.glob("prompts*.txt"):
        exemplars = prompt.read_text().strip("\n").split("\n\n")
        (dst / prompt.name).write_text("\n\n".join(exemplars[:n_exemplars]) + "\n")
    return folder


@pytest.fixture(scope="module")
def cqa_data(shared_data, work) -> pathlib.Path:
    return _cqa_slice(shared_data, work["root"] / "cqa_data")


def _cqa_args(work, data: pathlib.Path, out: pathlib.Path) -> list:
    return ["--task", "cqa", "--data-dir", data, "--config", work["cqa_cfg"], "--base_model_location", work["base"],
            "--out-dir", out, "--n_iters", str(N_ITERS), "--n_train_samples", "8", "--gen_length", "24",
            "--eval_batch_size", "8", "--gradient_accumulation_steps", "1", "--no-progress"]


def test_commonsenseqa_slice_on_a_llama_hf_base(work, cqa_data):
    """CommonsenseQA's real prompts through `--hf`: a tiny random Llama in an HF folder whose tokenizer.json (a
    small BPE trained on the slice's prompts) encodes the few-shot prompt; nothing is kept, the run completes."""
    from helpers import random_params, write_bpe_tokenizer
    from mesh_transformer.config import load_config
    from mesh_transformer.hf import save_hf
    from mesh_transformer.model import CausalTransformer

    folder = work["root"] / "llama_cqa_base"
    cfg = load_config(dict(model_type="llama", layers=2, d_model=64, n_heads=4, n_kv_heads=2, n_vocab=512, d_ff=128,
                           seq=CQA_SEQ, compute_dtype="float32"))
    save_hf(cfg, random_params(CausalTransformer(cfg), seed=0, bias_scale=0.02), str(folder))
    texts = [p.read_text() for p in (cqa_data / "commonsenseqa").glob("*")]
    write_bpe_tokenizer(folder, texts, vocab_size=500)
    keys = json.loads(pathlib.Path(work["cqa_cfg"]).read_text())
    keys.pop("tokenizer")
    config = work["root"] / "llama_cqa_keys.json"
    config.write_text(json.dumps(keys))
    out = work["root"] / "cqa_llama"
    args = [a if a != work["base"] else str(folder) for a in _cqa_args(work, cqa_data, out)]
    args[args.index("--base_model_location")] = "--hf"
    args[args.index(work["cqa_cfg"])] = str(config)
    proc = run_cli("iteration_train.py", args, _env(work))
    check_ok(proc)
    rows = _check_report(out, N_ITERS)
    assert len(_lines(out / "iter_00" / "eval.jsonl")) == 8
    assert all(rows[n]["train"]["n"] == 8 for n in range(1, N_ITERS + 1))
    model = json.loads((out / "run_config.json").read_text())["model_config"]
    assert model["model_type"] == "llama" and model["tokenizer"] == str(folder)


def test_commonsenseqa_slice_end_to_end_skips_empty_iterations(work, cqa_data):
    out = work["root"] / "cqa_run"
    proc = run_cli("iteration_train.py", _cqa_args(work, cqa_data, out), _env(work))
    check_ok(proc)
    for n in range(1, N_ITERS + 1):
        assert f"iteration {n} kept no examples: nothing to fine-tune on; skipping it" in proc.stderr
    rows = _check_report(out, N_ITERS)
    assert set(rows[0]["dev_accuracy"]) == {"all"}
    assert len(_lines(out / "iter_00" / "eval.jsonl")) == 8
    for n in range(1, N_ITERS + 1):
        d = out / f"iter_{n:02d}"
        assert rows[n]["skipped"] and rows[n]["steps"] == 0 and rows[n]["train"]["kept"] == 0
        records = _lines(d / "rationales.jsonl")
        assert len(records) == 8 and not any(r["rationalized"] for r in records)  # CQA default: no rationalization
        for r in records:  # the first generated line only, in the CQA question format
            assert "\n" not in r["completion"] and r["question"].startswith("Q: ") and r["question"].endswith("\nA:")
        assert (d / "train.txt").read_text() == "" and (d / "train.jsonl").read_text() == ""
        assert not (d / "records").exists() and not (d / "ckpt").exists()


# --------------------------------------------------------------------------------------------------------------
# 3. resume: SIGKILL during generation / training / evaluation, rerun, same results
# --------------------------------------------------------------------------------------------------------------
TIMING = {"seconds", "time", "tokens_per_s", "mfu"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _snapshot(out: pathlib.Path) -> dict:
    """Everything a run decides, without timings."""
    snap = {"results.json": _strip(json.loads((out / "results.json").read_text()))}
    for d in sorted(out.glob("iter_*")):
        for name in ("rationales.jsonl", "eval.jsonl", "ckpt/metrics.jsonl"):
            if (d / name).exists():
                snap[f"{d.name}/{name}"] = _strip(_lines(d / name))
        for name in ("train.txt", "train.jsonl", "generation.json", "eval.json", "records/train.index"):
            if (d / name).exists():
                snap[f"{d.name}/{name}"] = (d / name).read_text()
        for rec in sorted((d / "records").glob("*.tfrecords")):
            snap[f"{d.name}/records/{rec.name}"] = rec.read_bytes()
        if (d / "ckpt" / "meta.json").exists():
            meta = json.loads((d / "ckpt" / "meta.json").read_text())
            step = d / "ckpt" / f"step_{meta['step']}" / "shard_0"
            snap[f"{d.name}/ckpt/step"] = meta["step"]
            for npz in sorted(step.glob("*.npz")):  # the fine-tuned weights and Adam state, bit for bit
                with np.load(npz) as z:
                    snap[f"{d.name}/ckpt/{npz.name}"] = [z[k].tobytes() for k in sorted(z.files)]
    return snap


@pytest.mark.parametrize("stage", ["generate", "train", "eval"])
def test_killed_run_resumes_to_the_same_results(work, arith_ref, stage):
    out = work["root"] / f"arith_killed_{stage}"
    killed = _arith_run(work, out, STAR_TEST_KILL_AT=f"{stage}:1")
    assert killed.returncode == -signal.SIGKILL, f"exit {killed.returncode}\n{killed.stderr[-3000:]}"
    d = out / "iter_01"
    if stage == "generate":  # the first chunk (4 of 8 questions) is on disk, nothing after it
        assert len(_lines(d / "rationales.jsonl")) == 4 and not (d / "generation.json").exists()
    elif stage == "train":  # killed at step 3: step 2 is committed, the final step 4 is not
        meta = json.loads((d / "ckpt" / "meta.json").read_text())
        assert meta["step"] == 2 and not (d / "eval.jsonl").exists()
        assert [m["step"] for m in read_metrics(d / "ckpt" / "metrics.jsonl")] == [1, 2, 3]
    else:  # the first eval chunk of iteration 1 is on disk; iteration 1 is not recorded as done
        assert len(_lines(d / "eval.jsonl")) == 4 and not (d / "eval.json").exists()
        assert [r["iteration"] for r in json.loads((out / "results.json").read_text())] == [0]

    check_ok(_arith_run(work, out))  # the same command again
    got, want = _snapshot(out), _snapshot(arith_ref)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], f"{key} differs after a kill during {stage}"


# --------------------------------------------------------------------------------------------------------------
# 4. bad inputs
# --------------------------------------------------------------------------------------------------------------
def test_malformed_jsonl_line_names_file_and_line(work, shared_data, tmp_path):
    data = _cqa_slice(shared_data, tmp_path / "data")
    train = data / "commonsenseqa" / "train_rand_split.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    lines[4] = lines[4][:60] + "\n"  # line 5 cut short
    train.write_text("".join(lines))
    proc = run_cli("iteration_train.py", _cqa_args(work, data, tmp_path / "out"), _env(work))
    err = error_line(proc)
    assert f"{train}:5: malformed JSON line" in err, err
    assert not (tmp_path / "out" / "iter_00").exists()  # failed before any generation


def test_device_inference_malformed_line_is_one_error_line(work, shared_data, tmp_path, capsys):
    """device_inference.py's __main__ is run_main(main): called in-process here."""
    data = _cqa_slice(shared_data, tmp_path / "data")
    dev = data / "commonsenseqa" / "dev_rand_split.jsonl"
    dev.write_text(dev.read_text() + "{not json\n")
    import device_inference
    from mesh_transformer.cli_util import run_main
    rc = run_main(device_inference.main, ["--config", work["cqa_cfg"], "--ckpt", work["base"], "--split", "dev",
                                          "--dataset_mode", "cqa", "--data-dir", str(data),
                                          "--out", str(tmp_path / "answers.jsonl")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 1 and len(err) == 1 and f"{dev}:9: malformed JSON line" in err[0], err
    assert not (tmp_path / "answers.jsonl").exists()


def test_missing_prompt_file_fails_before_the_model_loads(work, shared_data, tmp_path):
    data = _cqa_slice(shared_data, tmp_path / "data")
    (data / "commonsenseqa" / "prompts.txt").unlink()
    proc = run_cli("iteration_train.py", _cqa_args(work, data, tmp_path / "out"), _env(work))
    err = error_line(proc)
    assert "prompt file" in err and str(data / "commonsenseqa" / "prompts.txt") in err and "--data-dir" in err, err
    assert not (tmp_path / "out" / "iter_00").exists()


def test_unknown_task_is_an_argparse_error(capsys):
    import iteration_train
    with pytest.raises(SystemExit) as exc:
        iteration_train.parse_args(["--task", "chess"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--task 'chess' does not exist" in err
    for name in ("arithmetic", "commonsenseqa", "gsm8k"):
        assert name in err
    assert iteration_train.parse_args(["--task", "cqa"]).task == "commonsenseqa"


def test_prompt_longer_than_seq_is_cut_from_the_left(work, caplog, tmp_path):
    """JaxBackend.generate_fn: a context (shared prefix + question) longer than seq keeps its last seq tokens, with a
    warning, and still generates: the same completions as generating the cut texts directly."""
    import jax

    from mesh_transformer.config import load_config
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.train import Trainer
    from star.backend import GenerationSettings, JaxBackend

    seq = 64
    cfg = load_config(write_config(tmp_path / "c.json", **{**TRAIN_KEYS, "seq": seq}))
    backend = JaxBackend(cfg, work["base"], GenerationSettings(batch_size=2), progress=False)
    backend.trainer = Trainer(cfg, mesh=make_mesh(1, jax.devices()[:1]))  # one device, not conftest's 8: quicker
    generate = backend.generate_fn(backend.base_params())
    prefix = "Input:\n1 + 2\nTarget:\n" + "x" * 50  # 71 bytes: every context is longer than seq
    questions = ["Input:\n3 + 4\nTarget:\n", "Input:\n5 6 + 7 8\nTarget:\n"]
    with caplog.at_level(logging.WARNING, logger="star"):
        out = generate(questions, prefix, 8, ["\n\n"])
    assert len(out) == 2 and all(isinstance(c, str) for c in out)
    assert any("2 prompt(s) longer than seq=64" in r.getMessage() and "truncated from the left" in r.getMessage()
               for r in caplog.records)
    cut = [(prefix + q)[-seq:] for q in questions]  # byte tokenizer: one token per byte
    assert cut[0] != cut[1] and generate(cut, "", 8, ["\n\n"]) == out  # same compiled shape: no new compile


def test_k_samples_keep_distinct_correct_rationales(tmp_path):
    """n_samples > 1: every question is answered k times; distinct correct answers are all kept, duplicates once;
    a question with no correct sample is rationalized; accuracy counts questions, not samples."""
    from star.rationales import PassOptions, run_pass, summarize
    from star.tasks import get_task

    task = get_task("arithmetic", min_digits=1, max_digits=2, n_train=6, n_dev=2, n_exemplars=0)
    examples = task.load("train")[:3]
    calls = {"n": 0}

    def fake_generate(prompts, prefix, max_new, stop):
        out = []
        for q in prompts:
            calls["n"] += 1
            ex = next(e for e in examples if task.format_question(e) == q or task.format_question(e, hint=True) == q)
            right = task.reference_completion(ex)
            if ex is examples[0]:  # two different correct texts across samples (one with a trailing space)
                out.append(right if calls["n"] % 2 else right.rstrip("\n") + " \n")
            elif ex is examples[1]:
                out.append(right)  # the same correct text every time: kept once
            else:
                out.append("<scratch>\nwrong\n</scratch>\n9 9 9\n" if q.endswith("Target:\n") else right)
        return out

    opts = PassOptions(rationalize=True, n_samples=3, chunk_size=4, progress=False)
    records = run_pass(task, examples, fake_generate, opts, str(tmp_path / "r.jsonl"))
    by_id = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(r)
    summary = summarize(records)
    assert summary["n"] == 3 and abs(summary["accuracy"] - 2 / 3) < 1e-9
    assert len(by_id[examples[0].id]) == 2  # two distinct correct texts: both kept
    assert len(by_id[examples[1].id]) == 1  # duplicates kept once
    assert [r["rationalized"] for r in by_id[examples[2].id]] == [True]  # no correct sample -> rationalized
    assert all(r["keep"] for r in records if r["id"] != examples[2].id or r["correct"])
    # resuming reads the same 3 x 3 + 1 attempts back and makes no new calls
    before = calls["n"]
    again = run_pass(task, examples, fake_generate, opts, str(tmp_path / "r.jsonl"))
    assert calls["n"] == before and again == records


def test_anneal_per_finetune_decays_the_rate_within_each_fine_tune(work, tmp_path):
    """--anneal_each_finetune: the learning rate falls to near end_lr by a fine-tune's last step, whatever the
    config's anneal_steps; without it the config's schedule (anneal 1000 steps here) keeps the rate near its peak."""
    import jax

    from mesh_transformer.config import load_config
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.train import Trainer
    from star.backend import JaxBackend

    cfg = load_config(write_config(tmp_path / "c.json", **{**TRAIN_KEYS, "seq": 64, "anneal_steps": 1000}))
    pairs = tmp_path / "train.jsonl"
    pairs.write_text("".join(json.dumps({"context": f"Input:\n{a} + 1\nTarget:\n", "completion": f"{a + 1}\n"}) + "\n"
                             for a in range(40)))
    last_lr = {}
    for anneal in (False, True):
        backend = JaxBackend(cfg, work["base"], progress=False, anneal_per_finetune=anneal)
        backend.trainer = Trainer(cfg, mesh=make_mesh(1, jax.devices()[:1]))  # one device: quicker
        index = backend.pack(str(pairs), str(tmp_path / f"records_{anneal}"))
        lrs = []
        backend.finetune(backend.base_params(), index, 8, str(tmp_path / f"ckpt_{anneal}"),
                         on_step=lambda step, record: lrs.append(float(record["lr"])))
        assert len(lrs) == 8 and max(lrs) <= cfg.lr * (1 + 1e-6)
        last_lr[anneal] = lrs[-1]
    assert last_lr[False] > 0.9 * cfg.lr  # 8 of 1000 anneal steps: still at the peak
    assert last_lr[True] < 0.3 * cfg.lr  # annealed over the fine-tune's own 8 steps
