"""v1 checkpoint layout: read files laid out as mtj wrote them, round trips, resharding, atomic commit, retention,
gs:// through the storage emulator.

The synthetic "released" checkpoints are built here WITHOUT mesh_transformer.checkpoint/mtj_layout: the test
emulates mtj's write_ckpt (the real optax chain state, jax's own flatten order, np.array_split into 16 files,
np.savez) from mtj's per-shard module names, so it checks the file layout, not self-consistency.
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (pytest fixtures)
from mesh_transformer import checkpoint as ckpt
from mesh_transformer import mtj_layout
from mesh_transformer.config import load_config
from mesh_transformer.model import CausalTransformer
from mesh_transformer.train import TrainState, make_optimizer

S = 8  # shards of the synthetic "released" checkpoints
BF16 = ml_dtypes.bfloat16


def tiny_cfg(**kw):
    base = dict(layers=3, d_model=64, n_heads=8, n_vocab=256, seq=16, pe_rotary_dims=4, cores_per_replica=8,
                compute_dtype="float32")
    return load_config({**base, **kw})


# ------------------------------------------------------------------------------------------------- known trees
def known_params(cfg, seed=0):
    """Random values in every leaf (LayerNorm and biases too), so that every per-shard rule matters. The summed
    biases are multiples of 1/64, so that any split of them into shard parts sums exactly."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(CausalTransformer(cfg).init, jax.random.PRNGKey(0))
    params = {}
    for mod, leaves in shapes.items():
        params[mod] = {}
        for name, sd in leaves.items():
            if (mod, name) in (("embedding", "b"), ("layers/block/fc_out", "b")):
                x = rng.integers(-64, 64, sd.shape) / 64.0
            else:
                x = rng.standard_normal(sd.shape) * 0.3 + (1.0 if name == "scale" else 0.0)
            params[mod][name] = x.astype(np.float32)
    return params


def known_opt_state(cfg, params, count=7, seed=1):
    rng = np.random.default_rng(seed)
    rand = lambda p: (rng.standard_normal(p.shape) * 1e-3).astype(p.dtype)  # noqa: E731
    mu, nu = jax.tree.map(rand, params), jax.tree.map(lambda p: np.abs(rand(p)), params)

    def fill(x):
        if isinstance(x, optax.ScaleByAdamState):
            return x._replace(count=np.int32(count), mu=mu, nu=nu)
        if isinstance(x, optax.ScaleByScheduleState):
            return x._replace(count=np.int32(count))
        return x

    is_node = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))  # noqa: E731
    return jax.tree.map(fill, make_optimizer(cfg).init(params), is_leaf=is_node), mu, nu


_LOGITS = {}


def logits(cfg, params):
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _LOGITS:
        _LOGITS[key] = jax.jit(CausalTransformer(cfg).logits)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.n_vocab, (2, 12)), jnp.int32)
    return np.asarray(_LOGITS[key](jax.tree.map(jnp.asarray, params), tokens))


def assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


# ------------------------------------------------------------------------------------------------- mtj emulation
# our (module, name) -> (mtj module under causal_transformer_shard/~/, mtj name, per-shard rule)
P = "causal_transformer_shard/~/"
MTJ = {
    ("embedding", "w"): ("embedding_shard/~/linear", "w", ("cut", 0)),
    ("embedding", "b"): ("embedding_shard/~/linear", "b", ("sum",)),
    ("layers/block/q", "w"): ("layer_{i}/~/linear", "w", ("cut", 1)),
    ("layers/block/v", "w"): ("layer_{i}/~/linear_1", "w", ("cut", 1)),
    ("layers/block/k", "w"): ("layer_{i}/~/linear_2", "w", ("cut", 1)),
    ("layers/block/out", "w"): ("layer_{i}/~/linear_3", "w", ("cut", 0)),
    ("layers/block/fc_in", "w"): ("layer_{i}/~/linear_4", "w", ("cut", 1)),
    ("layers/block/fc_in", "b"): ("layer_{i}/~/linear_4", "b", ("cut", 0)),
    ("layers/block/fc_out", "w"): ("layer_{i}/~/linear_5", "w", ("cut", 0)),
    ("layers/block/fc_out", "b"): ("layer_{i}/~/linear_5", "b", ("sum",)),
    ("layers/block/ln", "scale"): ("layer_{i}/~/replicated_layer_norm", "scale", ("ln", 1.0)),
    ("layers/block/ln", "offset"): ("layer_{i}/~/replicated_layer_norm", "offset", ("ln", 0.0)),
    ("projection/ln_f", "scale"): ("projection_shard/~/replicated_layer_norm", "scale", ("ln", 1.0)),
    ("projection/ln_f", "offset"): ("projection_shard/~/replicated_layer_norm", "offset", ("ln", 0.0)),
    ("projection/lm_head", "w"): ("projection_shard/~/linear", "w", ("cut", 1)),
    ("projection/lm_head", "b"): ("projection_shard/~/linear", "b", ("cut", 0)),
}


def mtj_shard_tree(tree, s, shards, layers, moment=False, seed=0):
    """Shard s of a params (or Adam moment) tree, as mtj held it: one Haiku module per layer, cut per shard.
    Params: summed biases as uneven parts that add up to the real value; LayerNorm real on shard 0 and init values
    elsewhere. Moments: summed biases the same on every shard, LayerNorm on shard 0 and zeros elsewhere."""
    out = {}
    for (mod, name), (mtj_mod, mtj_name, rule) in MTJ.items():
        full = tree[mod][name]
        for i in (range(layers) if mod.startswith("layers") else [None]):
            x = full[i] if i is not None else full
            if rule[0] == "cut":
                part = np.split(x, shards, axis=rule[1])[s]
            elif rule[0] == "sum" and not moment:
                rng = np.random.default_rng(seed + (i or 0))
                parts = [rng.integers(-8, 8, x.shape) / 64.0 for _ in range(shards - 1)]
                part = (x - sum(parts)).astype(x.dtype) if s == 0 else parts[s - 1].astype(x.dtype)
            elif rule[0] == "sum":
                part = x
            else:  # LayerNorm
                part = x if s == 0 else np.full_like(x, 0.0 if moment else rule[1])
            out.setdefault(P + mtj_mod.format(i=i), {})[mtj_name] = part
    return out


def mtj_optimizer():
    """mtj's chain (device_train.py); mtj's own clip/decay have the same (empty) states as optax's."""
    return optax.chain(optax.scale(1), optax.clip_by_global_norm(1), optax.scale_by_adam(),
                       optax.add_decayed_weights(0), optax.scale(-1), optax.scale_by_schedule(lambda c: 0.0))


def mtj_state(params_s, step, mu_s=None, nu_s=None, count=0):
    """The state dict mtj's write_ckpt flattened: {opt_state, params, step} (slim: optax.scale(0), no leaves)."""
    if mu_s is None:
        opt_state = optax.scale(0.0).init(params_s)
    else:
        def fill(x):
            if isinstance(x, optax.ScaleByAdamState):
                return x._replace(count=np.int32(count), mu=mu_s, nu=nu_s)
            if isinstance(x, optax.ScaleByScheduleState):
                return x._replace(count=np.int32(count))
            return x
        is_node = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))  # noqa: E731
        opt_state = jax.tree.map(fill, mtj_optimizer().init(params_s), is_leaf=is_node)
    return {"opt_state": opt_state, "params": params_s, "step": np.int32(step)}


def write_released(root, cfg, params, step, shards=S, mu=None, nu=None, count=0, bf16=False, meta=True):
    """Writes {root}/step_{step}/shard_s/j.npz as mtj's write_ckpt did (+ meta.json as device_train.py)."""
    for s in range(shards):
        p_s = mtj_shard_tree(params, s, shards, cfg.layers)
        if bf16:
            p_s = jax.tree.map(lambda x: x.astype(BF16), p_s)
        m_s = n_s = None
        if mu is not None:
            m_s = mtj_shard_tree(mu, s, shards, cfg.layers, moment=True)
            n_s = mtj_shard_tree(nu, s, shards, cfg.layers, moment=True)
        leaves = jax.tree.leaves(mtj_state(p_s, step, m_s, n_s, count))
        folder = pathlib.Path(root, f"step_{step}", f"shard_{s}")
        folder.mkdir(parents=True, exist_ok=True)
        for j, idx in enumerate(np.array_split(np.arange(len(leaves)), 16)):
            with open(folder / f"{j}.npz", "wb") as f:
                np.savez(f, *[np.asarray(leaves[k]) for k in idx])
    if meta:
        with open(pathlib.Path(root, "meta.json"), "w") as f:
            json.dump({"step": step, "checkpoints": [step], "aux": {str(step): {"train_loader": {"pos": 3}}}}, f)
    return pathlib.Path(root, f"step_{step}")


# ------------------------------------------------------------------------------------------------- tests
def test_leaf_order_and_counts_of_gptj6b_structure():
    """Counts from the structure (no 6B arrays): 287 leaves slim, 861 full; our order == jax's flatten order."""
    cfg = load_config("gptj-6b").replace(d_model=32, n_vocab=64, pe_rotary_dims=2)  # 28 layers, small matrices
    fake = known_params(cfg)
    p_s = mtj_shard_tree(fake, 0, 1, cfg.layers)
    for with_opt, count in ((False, 287), (True, 861)):
        state = mtj_state(p_s, 0, *((p_s, p_s) if with_opt else (None, None)))
        paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        assert len(paths) == count == mtj_layout.leaf_count(28, with_opt)
        ours = mtj_layout.leaf_list(28, with_opt)
        for path, leaf in zip(paths, ours):
            if leaf.rule is None:
                assert ("count" in path) == (leaf.group != "step")
            else:
                mtj = leaf.rule.mtj_path(leaf.layer)
                module, name = mtj.rsplit("/", 1)
                assert f"['{module}']['{name}']" in path, (path, mtj)
                assert ("mu" in path, "nu" in path) == (leaf.group == "mu", leaf.group == "nu")
    names = [leaf.rule.mtj_path(leaf.layer) for leaf in mtj_layout.leaf_list(28, False)[:3]]
    assert names == [P + "embedding_shard/~/linear/b", P + "embedding_shard/~/linear/w", P + "layer_0/~/linear/w"]
    slim = mtj_layout.leaf_list(28, False)
    assert slim[12].rule.mtj_path(slim[12].layer) == P + "layer_1/~/linear/w"  # 10 leaves per layer
    assert [slim[2 + 10 * k].layer for k in range(4)] == [0, 1, 10, 11]  # layer_10 sorts before layer_2
    assert slim[-2].rule.mtj_path(None) == P + "projection_shard/~/replicated_layer_norm/scale"
    assert slim[-1].group == "step"


@pytest.mark.parametrize("kind", ["slim_bf16", "full"])
def test_load_released_layout_matches_unsharded_model(tmp_path, kind):
    cfg = tiny_cfg()
    params = known_params(cfg)
    if kind == "full":
        _, mu, nu = known_opt_state(cfg, params, count=5)
        step_dir = write_released(tmp_path, cfg, params, 40, mu=mu, nu=nu, count=5)
        expected = params
    else:
        step_dir = write_released(tmp_path, cfg, params, 40, bf16=True)
        expected = jax.tree.map(lambda x: x.astype(BF16), params)

    loaded, opt_state, step, aux = ckpt.load_checkpoint(str(tmp_path), cfg)
    assert step == 40 and aux == {"train_loader": {"pos": 3}}
    assert_trees_equal(loaded, expected)
    np.testing.assert_array_equal(logits(cfg, loaded), logits(cfg, expected))
    if kind == "full":
        assert_trees_equal(opt_state, known_opt_state(cfg, params, count=5)[0])
        assert opt_state[2].mu["embedding"]["b"] is not None
    else:
        assert opt_state is None

    # the step folder itself (how the released weights are unpacked), and without the optimizer
    loaded2, opt2, step2, _ = ckpt.load_checkpoint(str(step_dir), cfg, with_opt=False)
    assert opt2 is None and step2 == 40
    assert_trees_equal(loaded2, expected)


def test_load_without_opt_reads_only_param_files(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    params = known_params(cfg)
    _, mu, nu = known_opt_state(cfg, params)
    write_released(tmp_path, cfg, params, 1, mu=mu, nu=nu)
    read = []
    real = ckpt._read_npz
    monkeypatch.setattr(ckpt, "_read_npz", lambda path, idx: read.append(path) or real(path, idx))
    loaded, opt_state, _, _ = ckpt.load_checkpoint(str(tmp_path), cfg, with_opt=False)
    assert opt_state is None
    assert_trees_equal(loaded, params)
    n = mtj_layout.leaf_count(cfg.layers, True)  # 111 leaves: the first 2/3 are optimizer state
    first_param_file = next(j for j, (a, b) in enumerate(mtj_layout.chunk_bounds(n)) if b > 2 * n // 3 + 1)
    assert len(read) == (16 - first_param_file) * S


def _files(root):
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npz"))}


def test_save_load_reshard_bit_exact(tmp_path):
    cfg = tiny_cfg()
    params = known_params(cfg)
    opt_state, _, _ = known_opt_state(cfg, params, count=9)
    state = TrainState(params, opt_state, jnp.asarray(9, jnp.int32))
    src = tmp_path / "s8"
    ckpt.save_checkpoint(str(src), state, 9, cfg, shards=8, aux={"train_loader": {"a": 1}})
    assert ckpt.latest_step(str(src)) == 9
    assert sorted(os.listdir(src / "step_9")) == [f"shard_{i}" for i in range(8)]
    assert len(os.listdir(src / "step_9" / "shard_0")) == 16
    loaded, opt, step, aux = ckpt.load_checkpoint(str(src), cfg)
    assert step == 9 and aux == {"train_loader": {"a": 1}}
    assert_trees_equal(loaded, params)
    assert_trees_equal(opt, opt_state)

    original = _files(src)
    for n in (1, 2, 4):
        mid, back = tmp_path / f"s{n}", tmp_path / f"s{n}_to8"
        ckpt.reshard(str(src), str(mid), n, cfg)
        assert sorted(os.listdir(mid / "step_9")) == [f"shard_{i}" for i in range(n)]
        p, o, st, ax = ckpt.load_checkpoint(str(mid), cfg)
        assert st == 9 and ax == {"train_loader": {"a": 1}}
        assert_trees_equal(p, params)
        assert_trees_equal(o, opt_state)
        ckpt.reshard(str(mid), str(back), 8, cfg)
        assert _files(back) == original  # byte-identical files after 8 -> n -> 8


def test_save_slim_writes_bf16_params_only(tmp_path):
    cfg = tiny_cfg()
    params = known_params(cfg)
    opt_state, _, _ = known_opt_state(cfg, params)
    ckpt.save_checkpoint(str(tmp_path), TrainState(params, opt_state, 3), 3, cfg, slim=True)
    n = sum(len(np.load(tmp_path / "step_3" / "shard_0" / f"{j}.npz").files) for j in range(16))
    assert n == mtj_layout.leaf_count(cfg.layers, False) == 37
    raw = np.load(tmp_path / "step_3" / "shard_0" / "0.npz")["arr_0"]
    assert raw.dtype == np.dtype("V2")  # what mtj's reader (and ours) see for bf16
    loaded, opt, _, _ = ckpt.load_checkpoint(str(tmp_path), cfg)
    assert opt is None
    assert_trees_equal(loaded, jax.tree.map(lambda x: x.astype(BF16), params))


def test_shape_mismatch_errors_name_the_leaf_and_the_key(tmp_path):
    cfg = tiny_cfg()
    write_released(tmp_path, cfg, known_params(cfg), 2)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(str(tmp_path), tiny_cfg(d_model=128, n_heads=8))
    msg = str(e.value)
    assert "params embedding/b" in msg and "embedding_shard/~/linear/b" in msg and "shard_0/0.npz" in msg
    assert "(64,)" in msg and "(128,)" in msg and "'d_model': 64" in msg
    with pytest.raises(ckpt.CheckpointError, match=r"'n_vocab': 256"):
        ckpt.load_checkpoint(str(tmp_path), tiny_cfg(n_vocab=512))
    with pytest.raises(ckpt.CheckpointError, match=r"'layers': 3"):
        ckpt.load_checkpoint(str(tmp_path), tiny_cfg(layers=4))
    with pytest.raises(ckpt.CheckpointError, match="d_model"):
        ckpt.save_checkpoint(str(tmp_path / "x"), known_params(cfg), 1, tiny_cfg(d_model=32))
    with pytest.raises(ckpt.CheckpointError, match="n_heads"):
        ckpt.save_checkpoint(str(tmp_path / "y"), known_params(cfg), 1, cfg, shards=3)


def test_crash_mid_save_keeps_the_previous_step(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    p10, p20 = known_params(cfg, 10), known_params(cfg, 20)
    root = str(tmp_path)
    ckpt.save_checkpoint(root, p10, 10, cfg, shards=2)

    real, calls = ckpt._write_npz, []

    def flaky(path, arrays):
        calls.append(path)
        if len(calls) > 5:
            raise OSError("disk on fire")
        real(path, arrays)

    monkeypatch.setattr(ckpt, "_write_npz", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        ckpt.save_checkpoint(root, p20, 20, cfg, shards=2)
    calls.clear()
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, p20, 30, cfg, shards=2)
    monkeypatch.setattr(ckpt, "_write_npz", real)

    # the second save removed the first one's leftover (newer than every committed step); its own is left
    assert not (tmp_path / "step_20").exists() and (tmp_path / "step_30").is_dir()
    assert ckpt.latest_step(root) == 10
    assert json.loads((tmp_path / "meta.json").read_text())["checkpoints"] == [10]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("meta.json.tmp")]
    loaded, _, step, _ = ckpt.load_checkpoint(root, cfg)
    assert step == 10
    assert_trees_equal(loaded, p10)
    with pytest.raises(ckpt.CheckpointError, match="not a committed checkpoint"):
        ckpt.load_checkpoint(root, cfg, step=20)

    ckpt.save_checkpoint(root, p20, 20, cfg, shards=2)  # overwrites step_20, removes the stale step_30
    assert not (tmp_path / "step_30").exists()
    assert ckpt.latest_step(root) == 20
    assert_trees_equal(ckpt.load_checkpoint(root, cfg)[0], p20)
    assert_trees_equal(ckpt.load_checkpoint(root, cfg, step=10)[0], p10)


def test_keep_n_and_keep_every(tmp_path):
    cfg = tiny_cfg(layers=1)
    params = known_params(cfg)
    root = str(tmp_path)
    for step in range(1, 11):
        ckpt.save_checkpoint(root, params, step, cfg, shards=1, aux={"i": step}, keep_n=3, keep_every=4)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["checkpoints"] == [4, 8, 9, 10] and meta["step"] == 10
    assert sorted(meta["aux"], key=int) == ["4", "8", "9", "10"]
    assert "deleting" not in meta
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("step_")) == ["step_10", "step_4", "step_8",
                                                                                "step_9"]
    assert ckpt.load_checkpoint(root, cfg, step=4)[3] == {"i": 4}
    # re-saving a listed step moves it to the end (the latest, as mtj's checkpoints[-1])
    ckpt.save_checkpoint(root, params, 8, cfg, shards=1, keep_n=3, keep_every=4)
    assert json.loads((tmp_path / "meta.json").read_text())["checkpoints"] == [4, 9, 10, 8]
    assert ckpt.latest_step(root) == 8
    # keep_n None (the default) keeps everything
    ckpt.save_checkpoint(root, params, 11, cfg, shards=1)
    assert json.loads((tmp_path / "meta.json").read_text())["checkpoints"] == [4, 9, 10, 8, 11]


def test_checkpoint_dir():
    assert ckpt.checkpoint_dir(tiny_cfg(bucket="my-bucket", model_dir="runs/a/")) == "gs://my-bucket/runs/a"
    assert ckpt.checkpoint_dir(tiny_cfg(model_dir="/tmp/x")) == "/tmp/x"
    assert ckpt.checkpoint_dir(tiny_cfg(bucket="b", model_dir="gs://other/y")) == "gs://other/y"
    with pytest.raises(ckpt.CheckpointError, match="model_dir"):
        ckpt.checkpoint_dir(tiny_cfg())


def test_gcs_round_trip(gcs_bucket, tmp_path):  # noqa: F811
    from google.cloud import storage
    cfg = tiny_cfg(layers=2)
    params = known_params(cfg)
    opt_state, _, _ = known_opt_state(cfg, params)
    root = f"gs://{gcs_bucket}/runs/a"
    assert ckpt.latest_step(root) is None
    ckpt.save_checkpoint(root, TrainState(params, opt_state, 1), 1, cfg, shards=2, aux={"x": 1}, keep_n=1)
    ckpt.save_checkpoint(root, TrainState(params, opt_state, 2), 2, cfg, shards=2, aux={"x": 2}, keep_n=1)
    assert ckpt.latest_step(root) == 2
    names = {b.name for b in storage.Client().list_blobs(gcs_bucket)}
    assert "runs/a/meta.json" in names and not [n for n in names if "/step_1/" in n]
    assert len([n for n in names if "/step_2/" in n]) == 2 * 16
    loaded, opt, step, aux = ckpt.load_checkpoint(root, cfg)
    assert step == 2 and aux == {"x": 2}
    assert_trees_equal(loaded, params)
    assert_trees_equal(opt, opt_state)
    ckpt.reshard(root, str(tmp_path / "local"), 1, cfg)  # gs:// -> local
    assert_trees_equal(ckpt.load_checkpoint(str(tmp_path / "local"), cfg)[0], params)


def test_save_sharded_device_state_from_trainer(tmp_path):
    """What training saves: a TrainState sharded over a (dp, mp) = (4, 2) mesh of the 8 CPU devices."""
    from mesh_transformer.train import Trainer
    cfg = tiny_cfg(layers=1, cores_per_replica=2)
    params = known_params(cfg)
    opt_state, _, _ = known_opt_state(cfg, params, count=4)
    state = Trainer(cfg).state_from_params(params, opt_state, 4)
    assert len(state.params["layers/block/q"]["w"].sharding.device_set) == 8
    ckpt.save_checkpoint(str(tmp_path), state, 4, cfg)  # shards = cores_per_replica
    assert sorted(os.listdir(tmp_path / "step_4")) == ["shard_0", "shard_1"]
    loaded, opt, step, _ = ckpt.load_checkpoint(str(tmp_path), cfg)
    assert step == 4
    assert_trees_equal(loaded, params)
    assert_trees_equal(opt, opt_state)
