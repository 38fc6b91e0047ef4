"""Test set-up: 8 simulated CPU devices for dp x mp meshes, and paths to the shared data."""
import os

# Must happen before jax touches a device.
# The fast-compile flags cut the suite's time (it is mostly XLA compiling tiny programs) by about 40%; every
# comparison in the tests is between programs compiled the same way, or against a tolerance.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("STAR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data (CI has it); tests that need it skip, saying why, where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not found (set STAR_SHARED_DATA to a copy of shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_data) -> pathlib.Path:
    path = shared_data / "gpt2_tokenizer"
    if not (path / "vocab.json").exists():
        pytest.skip(f"{path}/vocab.json not found")
    return path
