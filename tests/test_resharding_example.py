"""resharding_example.py: an 8-shard v1 checkpoint loads onto one device and samples what the unsharded model does."""
import jax
import numpy as np

from cli_helpers import TINY, check_ok, cli_env, run_cli, write_config
from mesh_transformer import checkpoint as ckpt
from mesh_transformer.config import load_config
from mesh_transformer.model import CausalTransformer
from mesh_transformer.sampling import Sampler
from mesh_transformer.sharding import make_mesh
from mesh_transformer.tokenizer import get_tokenizer


def test_eight_shard_checkpoint_samples_on_one_device(tmp_path):
    config_path = write_config(tmp_path / "tiny.json", cores_per_replica=8, n_heads=8)
    cfg = load_config(config_path)
    params = jax.tree.map(np.asarray, CausalTransformer(cfg).init(jax.random.PRNGKey(3)))
    ckpt.save_checkpoint(str(tmp_path / "ckpt"), params, 7, cfg, shards=8)
    assert len(list((tmp_path / "ckpt" / "step_7").glob("shard_*"))) == 8

    proc = run_cli("resharding_example.py", ["--config", config_path, "--ckpt", tmp_path / "ckpt",
                                             "--cores-per-replica", "1", "--prompt", "Hello", "--temperature", "0",
                                             "--max-new-tokens", "8"], cli_env(1))
    check_ok(proc)
    assert "loaded step 7" in proc.stdout and "mp=1" in proc.stdout

    one = load_config(config_path).replace(cores_per_replica=1)
    expected = Sampler(CausalTransformer(one), params, mesh=make_mesh(1, jax.devices()[:1])).generate(
        ["Hello"], get_tokenizer("byte"), max_new_tokens=8, temperature=0.0, stop=(), batch_size=1)[0]
    assert proc.stdout.rstrip("\n").endswith("Hello" + expected.rstrip("\n")) or ("Hello" + expected) in proc.stdout
