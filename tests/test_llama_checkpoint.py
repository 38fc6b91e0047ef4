"""Fine-tuning the Llama family: checkpoints whose steps are HF folders, resumed bit-exactly, and the training maths.

- a TrainState saved and loaded is the same bits (params, Adam moments, counters), for each family, in one
  safetensors file and split over a sharded index, on a local disk and on gs:// (storage emulator); the step folder
  loads in transformers' `from_pretrained` with the same logits as ours; a slim step is bf16 and params only;
- `device_train.py --hf FOLDER` fine-tunes a tiny random Llama; SIGKILLed in the middle of writing a checkpoint and
  rerun with the same command, it reproduces the uninterrupted run exactly (every metrics line, final params and Adam
  state);
- gradient accumulation 4 x b == one batch of 4b rows for a Llama (GQA, q/k/v bias);
- a step of another model, or a damaged file, is named with what to do;
- `device_inference.py --hf FOLDER` answers as a checkpoint of the same params does.
"""
from __future__ import annotations

import json
import signal

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cli_helpers import (TRAIN_KEYS, check_ok, cli_env, make_dataset, metrics_subset, read_metrics,  # noqa: E402
                         run_cli)
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: E402,F401  (pytest fixtures)
from helpers import adam_mu, assert_same_first_step, random_params  # noqa: E402
from mesh_transformer import checkpoint as ckpt  # noqa: E402
from mesh_transformer import hf_checkpoint, sharding  # noqa: E402
from mesh_transformer.config import load_config  # noqa: E402
from mesh_transformer.hf import load_hf  # noqa: E402
from mesh_transformer.loading import hf_config  # noqa: E402
from mesh_transformer.model import CausalTransformer  # noqa: E402
from mesh_transformer.train import Trainer  # noqa: E402

COMMON = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              max_position_embeddings=64, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_key_value_heads=2)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, num_key_value_heads=4,
                                                                            tie_word_embeddings=True)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, num_key_value_heads=2,
                                                                                  sliding_window=5, head_dim=8)),
}
TRAINING = dict(seq=32, per_replica_batch=2, warmup_steps=1, anneal_steps=10, lr=1e-3, end_lr=1e-4,
                weight_decay=0.1, compute_dtype="float32")


def _hf_folder(name: str, folder) -> str:
    torch.manual_seed(0)
    FAMILIES[name]().save_pretrained(str(folder))
    return str(folder)


def _trained_state(cfg, params, steps: int = 2):
    """A TrainState after `steps` optimizer steps (non-zero moments and counters), on one device."""
    trainer = Trainer(cfg, sharding.make_mesh(1, devices=jax.devices()[:1]))
    state = trainer.state_from_params(params)
    rs = np.random.RandomState(0)
    for _ in range(steps):
        tokens = rs.randint(0, cfg.n_vocab, (1, cfg.per_replica_batch, cfg.seq + 1)).astype(np.int32)
        state, _ = trainer.train_step(state, {"tokens": tokens, "loss_mask": np.ones_like(tokens)})
    return jax.device_get(state)


def _assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, folder, config, trained state) per family."""
    folder = _hf_folder(request.param, tmp_path_factory.mktemp(request.param))
    cfg, params = load_hf(folder, **TRAINING)
    return request.param, folder, cfg, _trained_state(cfg, params)


@pytest.mark.parametrize("split", [False, True], ids=["one_file", "sharded_index"])
def test_train_state_round_trips_bit_exact_and_loads_in_transformers(family, split, tmp_path, monkeypatch):
    name, _, cfg, state = family
    if split:
        monkeypatch.setattr(hf_checkpoint, "MAX_FILE_BYTES", 20_000)  # ~ several files for these 0.2 MB
    out = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(out, state, 2, cfg, aux={"train_loader": {"record_idx": 7}})
    step_dir = tmp_path / "ckpt" / "step_2"
    files = sorted(p.name for p in step_dir.iterdir())
    assert "optimizer.safetensors" in files and "config.json" in files
    if split:
        index = json.loads((step_dir / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2 and "model.safetensors" not in files
    params, opt_state, step, aux = ckpt.load_checkpoint(out, cfg)
    assert step == 2 and aux == {"train_loader": {"record_idx": 7}}
    _assert_same(params, state.params)
    _assert_same(opt_state, state.opt_state)
    # the step folder is an HF model folder: transformers loads it and computes our logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(step_dir), dtype=torch.float32).eval()
    assert type(hf).__name__.lower().startswith(name)
    ids = np.array([[5, 17, 99, 3, 8, 41, 77, 120]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.float().numpy()
    ours = np.asarray(CausalTransformer(cfg).logits(params, ids))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_slim_step_is_bf16_params_only(family, tmp_path):
    _, _, cfg, state = family
    out = str(tmp_path / "slim")
    ckpt.save_checkpoint(out, state, 5, cfg, slim=True)
    assert not (tmp_path / "slim" / "step_5" / "optimizer.safetensors").exists()
    assert json.loads((tmp_path / "slim" / "step_5" / "config.json").read_text())["dtype"] == "bfloat16"
    params, opt_state, step, _ = ckpt.load_checkpoint(out, cfg)
    assert opt_state is None and step == 5
    import ml_dtypes
    _assert_same(params, jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), state.params))


def test_to_hf_weights_writes_the_familys_folder(family, tmp_path):
    """to_hf_weights.py's conversion of a Llama-family checkpoint: that family's HF folder, the same params."""
    from mesh_transformer.convert import checkpoint_to_hf
    name, _, cfg, state = family
    ckpt.save_checkpoint(str(tmp_path / "ckpt"), state, 2, cfg)
    assert checkpoint_to_hf(str(tmp_path / "ckpt"), cfg, str(tmp_path / "hf"), dtype="fp32") == 2
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["model_type"] == name and saved["architectures"][0].lower().startswith(name)
    _, params = load_hf(str(tmp_path / "hf"))
    _assert_same(params, state.params)


def test_round_trip_on_gcs(family, gcs_bucket):  # noqa: F811
    _, _, cfg, state = family
    url = f"gs://{gcs_bucket}/llama_ckpt"
    ckpt.save_checkpoint(url, state, 3, cfg, keep_n=1)
    ckpt.save_checkpoint(url, state, 4, cfg, keep_n=1)  # step 3 is removed after step 4's commit
    assert ckpt.latest_step(url) == 4
    params, opt_state, step, _ = ckpt.load_checkpoint(url, cfg)
    assert step == 4
    _assert_same(params, state.params)
    _assert_same(opt_state, state.opt_state)
    with pytest.raises(ckpt.CheckpointError, match="step 3 is not a committed checkpoint"):
        ckpt.load_checkpoint(url, cfg, step=3)


def test_wrong_model_and_damaged_files_are_named(family, tmp_path):
    name, _, cfg, state = family
    out = tmp_path / "ckpt"
    ckpt.save_checkpoint(str(out), state, 1, cfg)
    ckpt.save_checkpoint(str(out), state, 2, cfg)
    with pytest.raises(ckpt.CheckpointError, match="num_hidden_layers=2.*layers=3"):
        ckpt.load_checkpoint(str(out), cfg.replace(layers=3))
    # a damaged latest step falls back to the previous one, naming the file
    (out / "step_2" / "optimizer.safetensors").write_bytes(b"garbage")
    params, _, step, _ = ckpt.load_checkpoint(str(out), cfg)
    assert step == 1
    with pytest.raises(ckpt.CorruptCheckpointError, match="optimizer.safetensors"):
        ckpt.load_checkpoint(str(out), cfg, step=2)


def test_recover_meta_finds_the_complete_hf_steps(family, tmp_path):
    """--recover-meta (run_identity.recover_meta) on a Llama-family folder whose meta.json is lost: the complete HF
    steps are named again, a step without its config.json (a crashed save) is not."""
    from mesh_transformer import run_identity
    _, _, cfg, state = family
    out = tmp_path / "ckpt"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(str(out), state, step, cfg)
    (out / "meta.json").unlink()
    (out / "step_3" / "config.json").unlink()  # as a save killed before its last file
    assert run_identity.recover_meta(str(out), cfg) == [1, 2]
    params, _, step, _ = ckpt.load_checkpoint(str(out), cfg)
    assert step == 2
    _assert_same(params, state.params)


# ---------------------------------------------------------------------------------------------------------------
# device_train.py --hf: killed in the middle of a checkpoint, rerun, resumed bit-exactly
# ---------------------------------------------------------------------------------------------------------------
STEPS, CKPT_EVERY, CRASH_AT = 8, 3, 6
COMPARED = ("step", "loss", "ce", "lr", "grad_norm")


def _train(folder, config, cache, **env):
    return run_cli("device_train.py", ["--config", config, "--hf", folder, "--no-progress"],
                   cli_env(2, cache, **env))


def _config(path, model_dir, train_index) -> str:
    keys = dict(TRAIN_KEYS, seq=32, tokenizer="byte", total_steps=STEPS, ckpt_every=CKPT_EVERY, keep_n=2,
                train_set=train_index, model_dir=str(model_dir), name="llama_run")
    path.write_text(json.dumps(keys))
    return str(path)


def test_device_train_hf_crash_mid_checkpoint_resumes_exactly(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_train")
    cache = tmp_path_factory.getbasetemp() / "xla_cache"
    folder = _hf_folder("llama", root / "base")
    train_index = make_dataset(root / "data", "train", n_docs=200, seed=1)
    config_a = _config(root / "a.json", root / "a", train_index)
    check_ok(_train(folder, config_a, cache))
    metrics_a = read_metrics(root / "a" / "metrics.jsonl")
    assert [m["step"] for m in metrics_a] == list(range(1, STEPS + 1))
    assert metrics_a[-1]["loss"] < metrics_a[0]["loss"]

    config_b = _config(root / "b.json", root / "b", train_index)
    crashed = _train(folder, config_b, cache, STAR_TEST_CRASH_AT_STEP=str(CRASH_AT))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert ckpt.latest_step(str(root / "b")) == CKPT_EVERY  # step 6 is half written: params, no optimizer state
    half = sorted(p.name for p in (root / "b" / f"step_{CRASH_AT}").iterdir())
    assert "model.safetensors" in half and "optimizer.safetensors" not in half and "config.json" not in half

    check_ok(_train(folder, config_b, cache))  # the same command again
    metrics_b = read_metrics(root / "b" / "metrics.jsonl")
    assert [m["step"] for m in metrics_b] == list(range(1, STEPS + 1))  # no duplicate lines
    assert metrics_subset(metrics_b, COMPARED) == metrics_subset(metrics_a, COMPARED)  # bit-exact on CPU
    cfg = hf_config(folder, config_a)
    pa, oa, sa, aux_a = ckpt.load_checkpoint(str(root / "a"), cfg)
    pb, ob, sb, aux_b = ckpt.load_checkpoint(str(root / "b"), cfg)
    assert sa == sb == STEPS and aux_a == aux_b
    _assert_same(pa, pb)
    _assert_same(oa, ob)
    # and a finished step is a model folder of its own
    transformers.AutoModelForCausalLM.from_pretrained(str(root / "b" / f"step_{STEPS}"))


def test_device_train_hf_refuses_tune_model_path_too(tmp_path):
    proc = run_cli("device_train.py", ["--config", "tiny", "--hf", str(tmp_path), "--tune-model-path", "x"],
                   cli_env(1))
    assert proc.returncode == 2 and "--hf or --tune-model-path" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------------------------
def test_llama_grad_accumulation_4xb_equals_1x4b():
    """As tests/test_train.py's GPT-J test: GA=4 micro-batches of b rows == one batch of 4b rows, one step."""
    b, t = 2, 16
    base = dict(model_type="llama", layers=1, d_model=64, n_heads=8, n_kv_heads=2, n_vocab=256, seq=t, d_ff=96,
                qkv_bias=True, compute_dtype="float32", warmup_steps=0, anneal_steps=10, lr=1e-3, end_lr=1e-4,
                weight_decay=0.1, tokenizer="byte")
    tokens = np.random.RandomState(0).randint(0, 256, (4, b, t + 1)).astype(np.int32)  # [GA, b, T+1]
    params = random_params(CausalTransformer(base), seed=0)
    results = {}
    for ga, batch in [(4, tokens), (1, tokens.reshape(1, 4 * b, t + 1))]:
        cfg = load_config({**base, "gradient_accumulation_steps": ga, "per_replica_batch": 4 * b // ga})
        trainer = Trainer(cfg, sharding.make_mesh(1, devices=jax.devices()[:1]))
        state, metrics = trainer.train_step(trainer.state_from_params(params), {"tokens": batch})
        results[ga] = jax.device_get((state.params, adam_mu(state.opt_state), metrics))
    (p4, mu4, m4), (p1, mu1, m1) = results[4], results[1]
    for key in ("loss", "ce", "grad_norm", "tokens"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
    assert np.abs(p1["layers/block/gate"]["w"] - params["layers/block/gate"]["w"]).max() > 1e-4  # it moved
    assert_same_first_step(p4, p1, mu4, mu1, lr=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# device_inference.py --hf: the folder answers as its checkpoint does
# ---------------------------------------------------------------------------------------------------------------
def test_device_inference_hf_folder_equals_its_checkpoint(tmp_path):
    """The same tiny random Llama answers the same arithmetic questions from an HF folder (--hf) and from a
    checkpoint of the same params (--ckpt); the answers file records which source it came from."""
    folder = _hf_folder("llama", tmp_path / "hf")
    config = tmp_path / "train_keys.json"
    config.write_text(json.dumps(dict(seq=256, tokenizer="byte", compute_dtype="float32", per_replica_batch=4,
                                      model_dir=str(tmp_path / "unused"))))
    cfg, params = load_hf(folder, seq=256, tokenizer="byte", compute_dtype="float32")
    ckpt.save_checkpoint(str(tmp_path / "ckpt"), params, 0, cfg)
    llama_config = tmp_path / "llama.json"
    llama_config.write_text(json.dumps(cfg.to_dict()))
    common = ["--split", "train", "--dataset_mode", "arithmetic", "--n_train_samples", "4", "--gen_length", "12",
              "--eval_batch_size", "4"]
    answers = {}
    for name, source in [("hf", ["--config", str(config), "--hf", str(tmp_path / "hf")]),
                         ("ckpt", ["--config", str(llama_config), "--ckpt", str(tmp_path / "ckpt")])]:
        out = tmp_path / f"{name}.jsonl"
        check_ok(run_cli("device_inference.py", [*source, *common, "--out", str(out)], cli_env(1)))
        answers[name] = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
        identity = json.loads((tmp_path / f"{name}.jsonl.identity.json").read_text())
        assert str(tmp_path / name) in json.dumps(identity)
    assert len(answers["hf"]) == 4 and answers["hf"] == answers["ckpt"]
    assert len(set(answers["hf"])) > 1  # the answers depend on the question: the comparison has teeth
    proc = run_cli("device_inference.py", ["--config", str(config), "--hf", "x", "--ckpt", "y"], cli_env(1))
    assert proc.returncode == 2 and "--hf or --ckpt" in proc.stderr
