"""Config loading and validation: the original mtj / STaR JSON files load unchanged, and every bad config fails up
front with a ConfigError that names the key and says what to change (DESIGN section 3)."""
import json

import pytest

from conftest import REPO
from mesh_transformer.config import PRESETS, REQUIRED_KEYS, Config, ConfigError, load_config

CONFIGS = REPO / "configs"


def _tiny(**changes):
    raw = dict(layers=2, d_model=64, n_heads=4, n_vocab=256, seq=32)
    raw.update(changes)
    return raw


@pytest.mark.parametrize("name", ["6B_roto_256.json", "example_config.json"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    raw = json.loads((CONFIGS / name).read_text())
    for key, value in raw.items():  # every key of the original file survives, with its value
        got = getattr(cfg, key)
        if isinstance(got, tuple):
            got = list(got)
        assert got == value, key
    assert (cfg.layers, cfg.d_model, cfg.n_heads, cfg.n_vocab) == (28, 4096, 16, 50400)
    assert cfg.d_head == 256 and cfg.rotary_dims == 64 and cfg.ffn_dim == 16384


def test_star_qa_base_config_loads(shared_data):
    path = shared_data / "star" / "configs" / "qa_base.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    cfg = load_config(path)
    assert (cfg.seq, cfg.cores_per_replica, cfg.per_replica_batch, cfg.gradient_accumulation_steps) == (1536, 8, 1, 8)
    assert cfg.warmup_steps == 100 and cfg.lr == cfg.end_lr == 1e-6 and cfg.weight_decay == 0 and cfg.tpu_size == 8
    assert cfg.p_rationalization == 1.0 and cfg.target_save.endswith(".txt")


def test_presets_and_round_trip(tmp_path):
    for name in PRESETS:
        cfg = load_config(name)
        path = tmp_path / f"{name}.json"
        cfg.to_json(path)
        assert load_config(path) == cfg
    assert load_config("gptj-6b").n_params > 6e9
    assert isinstance(load_config(_tiny()), Config)


def test_unknown_key_suggests_closest():
    raw = _tiny()
    raw["layer"] = raw.pop("layers")
    with pytest.raises(ConfigError, match=r"'layer'.*did you mean 'layers'"):
        load_config(raw)
    with pytest.raises(ConfigError, match=r"'pe_rotary_dim'.*did you mean 'pe_rotary_dims'"):
        load_config(_tiny(pe_rotary_dim=8))


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_tiny(n_head=4)))
    with pytest.raises(ConfigError, match=r"'n_head'.*bad\.json.*did you mean 'n_heads'"):
        load_config(path)


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_required_key(key):
    raw = _tiny()
    del raw[key]
    with pytest.raises(ConfigError, match=rf"missing required key.*'{key}'"):
        load_config(raw)


def test_n_heads_must_divide_d_model():
    with pytest.raises(ConfigError, match=r"n_heads=5 does not divide d_model=64"):
        load_config(_tiny(n_heads=5))


def test_mp_must_divide_heads_and_vocab():
    with pytest.raises(ConfigError, match=r"cores_per_replica=8 does not divide n_heads=4.*set cores_per_replica"):
        load_config(_tiny(cores_per_replica=8))
    with pytest.raises(ConfigError, match=r"cores_per_replica=4 does not divide n_vocab=302.*pad n_vocab"):
        load_config(_tiny(cores_per_replica=4, n_vocab=302))
    assert load_config(_tiny(cores_per_replica=4, n_vocab=320)).n_vocab == 320


@pytest.mark.parametrize("rot", [32, 7, -2])  # d_head is 16: too large, odd, negative
def test_bad_rotary_dims(rot):
    with pytest.raises(ConfigError, match=rf"pe_rotary_dims={rot} must be an even number between 0 and d_head=16"):
        load_config(_tiny(pe_rotary_dims=rot))
    assert load_config(_tiny(pe_rotary_dims=16)).rotary_dims == 16
    assert load_config(_tiny()).rotary_dims == 16  # default: the whole head


@pytest.mark.parametrize("key,value", [("remat", "some"), ("compute_dtype", "fp8"), ("pe", "alibi"),
                                       ("attention_impl", "flash")])
def test_bad_choice_lists_supported(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' is '{value}'; supported values"):
        load_config(_tiny(**{key: value}))


def test_non_positive_shapes():
    with pytest.raises(ConfigError, match=r"'layers' must be a positive integer"):
        load_config(_tiny(layers=0))


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "layers": 2,\n  "d_model": 64\n  "n_heads": 4\n}\n')  # missing comma after line 3
    with pytest.raises(ConfigError, match=r"broken\.json is not valid JSON: line 4"):
        load_config(path)


def test_missing_file_and_preset_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"not found.*gptj-6b"):
        load_config(tmp_path / "nope.json")
