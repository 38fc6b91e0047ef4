"""from_hf_weights.py -> device_train.py -> to_hf_weights.py, and slim_model.py, end to end on a tiny GPT-J.

An HF GPTJForCausalLM (random, saved with save_pretrained) becomes a v1 checkpoint + config, is fine-tuned for 3 steps
from it (--tune-model-path), and the result is exported back to HF: GPTJForCausalLM.from_pretrained loads it, and its
logits equal our model's logits of the trained checkpoint (fp32). Conversion errors are one clear line and leave
existing outputs untouched.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cli_helpers import REPO, TINY, TRAIN_KEYS, check_ok, cli_env, make_dataset, read_metrics, run_cli, xla_cache_dir
from mesh_transformer import checkpoint as ckpt
from mesh_transformer import convert, mtj_layout
from mesh_transformer.cli_util import run_main
from mesh_transformer.config import load_config
from mesh_transformer.model import CausalTransformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_TOL = 1e-4  # max|ours - HF| / max|HF| in float32
TOKENS = np.random.RandomState(7).randint(0, TINY["n_vocab"], (2, 20))
TUNE_STEPS = 3


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def hf_logits(model_dir) -> np.ndarray:
    model = transformers.GPTJForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def our_logits(cfg, params) -> np.ndarray:
    return np.asarray(jax.jit(CausalTransformer(cfg).logits)(params, jnp.asarray(TOKENS)))


def load_cli(name: str):
    """A CLI module of the repo root, to call its main(argv) in this process."""
    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _capture_log(logger: logging.Logger):
    """The messages `logger` emits inside the block (a module fixture cannot use caplog)."""
    lines: list = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """from_hf_weights.py and to_hf_weights.py run in this process (main(argv), as the CLIs do; they compile
    nothing), device_train.py in a subprocess with 2 CPU devices."""
    root = tmp_path_factory.mktemp("convert")
    # 1. a random HF GPT-J (noise on every weight, so biases and LayerNorms matter)
    hf_cfg = transformers.GPTJConfig(vocab_size=TINY["n_vocab"], n_positions=64, n_embd=TINY["d_model"],
                                     n_layer=TINY["layers"], n_head=TINY["n_heads"], rotary_dim=TINY["pe_rotary_dims"],
                                     n_inner=None, bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(root / "hf_in"))

    # 2. from_hf_weights.py with a base config of training keys (its 6B shape keys are replaced by the HF ones)
    base = {"layers": 28, "d_model": 4096, "n_heads": 16, "n_vocab": 50400, "seq": TINY["seq"], **TRAIN_KEYS,
            "total_steps": TUNE_STEPS, "ckpt_every": 0,
            "train_set": make_dataset(root / "data", "train", n_docs=100, seed=3), "model_dir": str(root / "tuned"),
            "name": "hf_tune", "compute_dtype": "float32", "tokenizer": "byte"}
    (root / "base.json").write_text(json.dumps(base))
    logger = logging.getLogger("mesh_transformer.convert")
    with _capture_log(logger) as log_lines:
        assert run_main(load_cli("from_hf_weights").main, [
            "--hf-path", str(root / "hf_in"), "--output-ckpt", str(root / "imported"),
            "--base-config", str(root / "base.json"), "--shards", "2"]) == 0
    config = str(root / "imported.json")  # written beside the checkpoint

    # 3. fine-tune 3 steps from it, 4. export the result to HF
    env = cli_env(2, xla_cache_dir(tmp_path_factory))
    check_ok(run_cli("device_train.py", ["--config", config, "--tune-model-path", root / "imported", "--no-progress"],
                     env))
    assert run_main(load_cli("to_hf_weights").main, [
        "--input-ckpt", str(root / "tuned"), "--config", config, "--output-path", str(root / "hf_out"), "--cpu",
        "--dtype", "fp32"]) == 0
    return {"root": root, "config": config, "base": base, "hf_in": root / "hf_in", "imported": root / "imported",
            "tuned": root / "tuned", "hf_out": root / "hf_out", "env": env, "from_hf_log": "\n".join(log_lines)}


def test_from_hf_weights_writes_checkpoint_and_config(pipeline):
    raw = json.loads(pathlib.Path(pipeline["config"]).read_text())
    # shapes from the HF config.json, everything else from the base config
    assert {k: raw[k] for k in ("layers", "d_model", "n_heads", "n_vocab", "pe_rotary_dims", "d_ff")} == \
        {"layers": 2, "d_model": 64, "n_heads": 4, "n_vocab": 264, "pe_rotary_dims": 8, "d_ff": 256}
    for key in ("seq", "cores_per_replica", "lr", "train_set", "model_dir", "tokenizer", "compute_dtype", "name"):
        assert raw[key] == pipeline["base"][key], key
    assert "ignoring these keys" in pipeline["from_hf_log"] and "layers 28 -> 2" in pipeline["from_hf_log"]

    cfg = load_config(pipeline["config"])
    imported = pipeline["imported"]
    assert ckpt.latest_step(str(imported)) == 0
    assert sorted(p.name for p in (imported / "step_0").iterdir()) == ["shard_0", "shard_1"]
    params, opt_state, step, _ = ckpt.load_checkpoint(str(imported), cfg)
    assert opt_state is None and step == 0  # params only
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    ratio = rel_err(our_logits(cfg, params), hf_logits(pipeline["hf_in"]))
    print(f"\nimported HF model: max|ours - HF| / max|HF| = {ratio:.2e}")
    assert ratio < PARITY_TOL


def test_hf_to_training_to_hf_logits_match(pipeline):
    """Must-show 5: HF -> v1 -> 3 training steps -> HF: from_pretrained's logits == ours on the trained params."""
    cfg = load_config(pipeline["config"])
    metrics = read_metrics(pipeline["tuned"] / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    params, _, step, _ = ckpt.load_checkpoint(str(pipeline["tuned"]), cfg, with_opt=False)
    assert step == TUNE_STEPS
    ours = our_logits(cfg, params)
    ref = hf_logits(pipeline["hf_out"])
    ratio = rel_err(ours, ref)
    moved = rel_err(ours, hf_logits(pipeline["hf_in"]))
    print(f"\ntrained -> HF: max|ours - HF| / max|HF| = {ratio:.2e} (training moved the logits by {moved:.2e})")
    assert ratio < PARITY_TOL
    assert moved > 100 * PARITY_TOL  # the comparison is of the TRAINED weights
    hf_config = json.loads((pipeline["hf_out"] / "config.json").read_text())
    assert hf_config["eos_token_id"] == 256 and hf_config["torch_dtype"] == "float32"  # the byte tokenizer's EOS


def test_slim_model(pipeline):
    cfg = load_config(pipeline["config"])
    full, opt_state, _, _ = ckpt.load_checkpoint(str(pipeline["tuned"]), cfg)
    assert opt_state is not None
    # the CLI: defaults to the config's model_dir as input and {input}_slim as output; 1 shard instead of 2
    check_ok(run_cli("slim_model.py", ["--config", pipeline["config"], "--shards", "1"], pipeline["env"]))
    slim_dir = pathlib.Path(str(pipeline["tuned"]) + "_slim")
    files = sorted((slim_dir / f"step_{TUNE_STEPS}").iterdir())
    assert [p.name for p in files] == ["shard_0"] and len(list(files[0].glob("*.npz"))) == mtj_layout.PIECES
    slim, slim_opt, step, _ = ckpt.load_checkpoint(str(slim_dir), cfg)
    assert slim_opt is None and step == TUNE_STEPS
    n_leaves = sum(len(np.load(f).files) for f in files[0].glob("*.npz"))
    assert n_leaves == mtj_layout.leaf_count(cfg.layers, False) == 10 * cfg.layers + 7
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(ml_dtypes.bfloat16)), slim, full)
    # --f16 through the library, with 4 shards
    convert.slim_checkpoint(str(pipeline["tuned"]), str(pipeline["root"] / "slim16"), cfg, shards=4, dtype="fp16")
    half, _, _, _ = ckpt.load_checkpoint(str(pipeline["root"] / "slim16"), cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(np.float16)), half, full)


def test_conversion_errors_are_one_line_and_write_nothing(pipeline, capsys, tmp_path):
    from_hf, to_hf, slim = load_cli("from_hf_weights"), load_cli("to_hf_weights"), load_cli("slim_model")

    def error(module, argv) -> str:
        assert run_main(module.main, [str(a) for a in argv]) == 1
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1
        return lines[0]

    imported = pipeline["imported"]
    meta = (imported / "meta.json").read_bytes()
    line = error(from_hf, ["--hf-path", pipeline["hf_in"], "--output-ckpt", imported,
                           "--output-config", tmp_path / "c.json"])
    assert "already holds a checkpoint" in line and str(imported) in line
    assert (imported / "meta.json").read_bytes() == meta and not (tmp_path / "c.json").exists()

    (tmp_path / "not_hf").mkdir()
    line = error(from_hf, ["--hf-path", tmp_path / "not_hf", "--output-ckpt", tmp_path / "out"])
    assert "config.json not found" in line and not (tmp_path / "out").exists()

    line = error(to_hf, ["--input-ckpt", tmp_path / "nowhere", "--config", pipeline["config"], "--output-path",
                         tmp_path / "hf"])
    assert "no checkpoint at" in line and "nowhere" in line and not (tmp_path / "hf").exists()

    wrong = {**json.loads(pathlib.Path(pipeline["config"]).read_text()), "n_vocab": 512}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    line = error(slim, ["--config", tmp_path / "wrong.json", "--input-ckpt", pipeline["tuned"], "--output-ckpt",
                        tmp_path / "slim"])
    assert "checkpoint leaf" in line and "'n_vocab': 264" in line and "n_vocab=512 in the config" in line
    assert ckpt.latest_step(str(tmp_path / "slim")) is None
