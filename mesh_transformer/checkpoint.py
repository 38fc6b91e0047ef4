"""Checkpoints in mesh-transformer-jax's v1 layout (the layout of the released GPT-J-6B weights), on a local disk or
on gs://.

Layout of a checkpoint folder `{dir}`:
  {dir}/meta.json                 {"step": N, "checkpoints": [..., N], "aux": {"N": {"train_loader": ...}}}
  {dir}/step_N/shard_s/j.npz      s in 0..S-1 (S shards), j in 0..15: chunk j of shard s's flattened mtj state
The leaf order, names and per-shard rules are in `mtj_layout`. Arrays are read back as host numpy in OUR layout
(stacked layers) whatever S the files have: resharding is a read followed by a write with another S.

Commit protocol (a crash never leaves meta.json naming an incomplete step):
  1. meta.json stops naming step N if it did (re-saving a step), then step_N/ is removed;
  2. every file of step_N/ is written;
  3. meta.json is replaced in one step (local: write a temp file, fsync, os.replace; gs://: one object write, which
     GCS makes atomic) - only now does step N exist for readers;
  4. old steps beyond `keep_n` (except multiples of `keep_every`) are removed; meta.json first stops naming them
     (and lists them under "deleting" until their files are gone, so a crash mid-delete is finished later).
The Llama family (model_type llama / qwen2 / mistral) has no v1 layout: its step_N folders are HF folders (config.json,
model.safetensors, optimizer.safetensors; hf_checkpoint.py), under the same meta.json and the same protocol.
A step_N folder that meta.json does not name is ignored by readers; the next save removes it if N is newer than every
named step (the leftover of a crashed save). Folders without any meta.json (e.g. released weights) are never
removed, except the folder of the very step being written.

Deviations from mtj (docs/DEVIATIONS.md):
- summed biases (embedding, fc_out) are written whole on shard 0 and as zeros on the other shards (mtj held b/S on
  each); both read back as the same sum, ours bit-exactly. LayerNorm params other than shard 0's hold their init
  values, exactly as mtj's files do.
- our optimizer state is optax's chain state; its Adam count/mu/nu and schedule count are written in the positions of
  mtj's (same chain, same order), so full checkpoints are interchangeable. Other optimizers cannot be written in full.
- keep_n / keep_every: mtj kept the last `keep_n` (3; STaR 20) and read but never used `keep_every`. Here
  keep_n=None keeps every step; steps that are multiples of keep_every are never removed and stay listed in meta.json.
- `checkpoints` keeps save order as mtj (the last entry is the latest); re-saving a step moves it to the end.
- files are byte-reproducible: npz members carry a fixed timestamp (np.savez stamps the current time). Same format.

Multi-process runs (jax.distributed; the state's arrays span several processes): the same files, written by
several writers. Shard folder s holds mp slice s, and the process whose device sits at mesh position (dp 0, mp s)
writes it (one writer per folder, the replicas on other dp rows write nothing); leaves laid out otherwise (e.g.
sharded over dp as well) are first resharded, leaf by leaf, to the mp-only layout. Process 0 does steps 1, 3 and 4
alone; barriers (distributed.barrier) put every process's step 2 after step 1 and before step 3, so meta.json
names a step only once every process has written all its files. The shard count must be the mesh's mp size.

Test hook: with the environment variable STAR_TEST_CRASH_AT_STEP=N, `save_checkpoint` of step N kills its own
process with SIGKILL after writing some (not all) of step N's files and before meta.json names the step, so tests
can check that a crash mid-save leaves the previous checkpoint usable and a restart resumes exactly (in a
multi-process run: right after this process's first file of step N, or, for a process that writes no folder, at
the same point as in one process). Never set it outside tests.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import jax
import ml_dtypes
import numpy as np
import optax

from . import mtj_layout as L
from .config import Config

log = logging.getLogger(__name__)
# np.load parses each .npy header with ast.literal_eval, and CPython 3.11's AST constructor keeps its recursion depth
# per interpreter, not per thread: with _read_npz running in a pool of threads (one per shard), a clean-clone test run
# failed once with "SystemError: AST constructor recursion depth mismatch" (see python/cpython#106905). So the
# npz reads take turns; a gs:// file's download, before it, still runs in parallel.
_NPZ_READ_LOCK = threading.Lock()

_STEP_RE = re.compile(r"^step_(\d+)$")
CRASH_ENV = "STAR_TEST_CRASH_AT_STEP"  # test hook, see the module docstring
_SHARD_RE = re.compile(r"^shard_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that does not exist, is incomplete, or does not fit the config; the message says what to do."""


class CorruptCheckpointError(CheckpointError):
    """A file of a checkpoint that cannot be read (truncated, not a zip, missing); the message names the file."""


# ================================================================================== storage: local paths or gs://
def _is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def _split_gcs(path: str) -> Tuple[str, str]:
    bucket, _, name = path[len("gs://"):].partition("/")
    return bucket, name


@functools.lru_cache(maxsize=None)
def _gcs_client_for(emulator: Optional[str], project: Optional[str]):
    from google.cloud import storage
    if emulator and not project:
        project = "emulator"  # the emulator accepts any project; the client insists on one
    return storage.Client(project=project)


def _gcs_client():
    """A google.cloud.storage client; honours STORAGE_EMULATOR_HOST (tests run against gcp-storage-emulator)."""
    return _gcs_client_for(os.environ.get("STORAGE_EMULATOR_HOST"), os.environ.get("GOOGLE_CLOUD_PROJECT"))


def _open(path: str, mode: str):
    if _is_gcs(path):
        from smart_open import open as sopen
        return sopen(path, mode, transport_params={"client": _gcs_client()})
    return open(path, mode)


def _exists(path: str) -> bool:
    """Whether the file exists."""
    if _is_gcs(path):
        bucket, name = _split_gcs(path)
        return _gcs_client().bucket(bucket).blob(name).exists()
    return os.path.isfile(path)


def _list_dirs(path: str) -> List[str]:
    """Names of the immediate sub-folders of path ([] if it does not exist)."""
    if _is_gcs(path):
        bucket, name = _split_gcs(path)
        it = _gcs_client().list_blobs(bucket, prefix=name.rstrip("/") + "/", delimiter="/")
        for _ in it:  # the prefixes are filled in while iterating
            pass
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in it.prefixes)
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))


def _rmtree(path: str) -> None:
    if _is_gcs(path):
        bucket, name = _split_gcs(path)
        client = _gcs_client()
        blobs = list(client.list_blobs(bucket, prefix=name.rstrip("/") + "/"))
        for blob in blobs:
            blob.delete()
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _makedirs(path: str) -> None:
    if not _is_gcs(path):
        os.makedirs(path, exist_ok=True)


def _write_text_atomic(path: str, text: str) -> None:
    if _is_gcs(path):  # a GCS object becomes visible whole or not at all
        with _open(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])


# ================================================================================== npz files
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _write_npz(path: str, arrays: List[np.ndarray]) -> None:
    """np.savez(f, *arrays) (members arr_0.npy, ...), with a fixed timestamp so equal arrays give equal bytes."""
    with _open(path, "wb") as f:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for i, a in enumerate(arrays):
                info = zipfile.ZipInfo(f"arr_{i}.npy", date_time=_ZIP_TIME)
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)
        if not _is_gcs(path):
            f.flush()
            os.fsync(f.fileno())


def _fix_dtype(a: np.ndarray) -> np.ndarray:
    # numpy has no bfloat16: mtj's bf16 leaves come back as 2-byte voids
    return a.view(ml_dtypes.bfloat16) if a.dtype == np.dtype("V2") else a


def _npz_len(path: str) -> int:
    """Number of arrays in an npz, reading only its directory."""
    try:
        with _open(path, "rb") as f:
            with zipfile.ZipFile(f) as zf:
                return len(zf.namelist())
    except (FileNotFoundError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CorruptCheckpointError(f"cannot read {path}: {_why(e)}; the checkpoint is incomplete or damaged, or "
                                     f"the path is wrong") from e
    except Exception as e:  # google.api_core NotFound and friends
        if type(e).__name__ == "NotFound":
            raise CorruptCheckpointError(f"{path} not found; the checkpoint is incomplete or the path is "
                                         f"wrong") from e
        raise


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split()) or 'no detail'}"


def _read_npz(path: str, indices: List[int]) -> Dict[int, np.ndarray]:
    """Arrays arr_i for i in indices."""
    try:
        if _is_gcs(path):
            with _open(path, "rb") as f:
                source = io.BytesIO(f.read())
        else:
            source = path
        with _NPZ_READ_LOCK, np.load(source, allow_pickle=False) as npz:
            return {i: _fix_dtype(npz[f"arr_{i}"]) for i in indices}
    except KeyError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise CorruptCheckpointError(f"cannot read {path}: {_why(e)}; the file is damaged (truncated or "
                                     f"overwritten)") from e


# ================================================================================== meta.json
def _read_meta(ckpt_dir: str) -> Optional[dict]:
    path = _join(ckpt_dir, "meta.json")
    if not _exists(path):
        return None
    try:
        with _open(path, "r") as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not isinstance(meta.get("checkpoints", []), list):
            raise ValueError(f"expected an object with a 'checkpoints' list, got {str(meta)[:60]!r}")
        [int(s) for s in meta.get("checkpoints", [])]
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged and cannot be read ({_why(e)}); rerun device_train.py with "
                              f"--recover-meta to rebuild it from the complete step folders, or restore it") from None
    meta.setdefault("checkpoints", [])
    meta.setdefault("aux", {})
    return meta


def _write_meta(ckpt_dir: str, meta: dict) -> None:
    _write_text_atomic(_join(ckpt_dir, "meta.json"), json.dumps(meta))


def latest_step(path: str) -> Optional[int]:
    """The step last committed to meta.json under path (mtj: checkpoints[-1]); None when there is none."""
    meta = _read_meta(path)
    if not meta or not meta["checkpoints"]:
        return None
    return int(meta["checkpoints"][-1])


def checkpoint_dir(cfg: Config) -> str:
    """gs://{bucket}/{model_dir} when the config names a bucket (as mtj), else model_dir as given (a local path or
    a full URL)."""
    if not cfg.model_dir:
        raise CheckpointError("config has no 'model_dir': set it to the checkpoint folder (with 'bucket' for gs://)")
    if not cfg.bucket or "://" in cfg.model_dir:
        return cfg.model_dir.rstrip("/")
    bucket = cfg.bucket[len("gs://"):] if cfg.bucket.startswith("gs://") else cfg.bucket
    return f"gs://{bucket.strip('/')}/{cfg.model_dir.strip('/')}"


# ================================================================================== our tree <-> mtj leaves
def _split_state(state: Any) -> Tuple[Any, Any]:
    """(params, opt_state or None) of a TrainState-like object or a bare params dict."""
    if hasattr(state, "params") and hasattr(state, "opt_state"):
        return state.params, state.opt_state
    return state, None


def _is_opt_node(x: Any) -> bool:
    return isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))


def _adam_parts(opt_state: Any) -> Tuple[Any, Any, Any, Any]:
    """(adam count, mu, nu, schedule count) of an optax chain state like train.make_optimizer's."""
    nodes = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_opt_node) if _is_opt_node(x)]
    adam = [x for x in nodes if isinstance(x, optax.ScaleByAdamState)]
    sched = [x for x in nodes if isinstance(x, optax.ScaleByScheduleState)]
    if len(adam) != 1:
        raise CheckpointError(f"the optimizer state has {len(adam)} scale_by_adam states; a full v1 checkpoint holds "
                              f"exactly one (mtj's chain). Save the params only (slim=True) for other optimizers")
    count = adam[0].count
    return count, adam[0].mu, adam[0].nu, (sched[0].count if sched else count)


def _check_divisible(cfg: Config, shards: int) -> None:
    for key, value in L.shard_divisors(cfg):
        if shards < 1 or value % shards:
            raise CheckpointError(f"cannot cut the model into {shards} shards: {key}={value} is not divisible by "
                                  f"{shards}; pick a shard count that divides n_heads, n_vocab and d_ff")


def _check_params(params: Any, cfg: Config) -> None:
    for rule in L.RULES:
        try:
            leaf = params[rule.module][rule.name]
        except (KeyError, TypeError):
            mtj = rule.mtj_path(0 if rule.stacked else None)
            raise CheckpointError(f"params have no leaf {rule.module}/{rule.name} (mtj {mtj}); pass "
                                  f"CausalTransformer params") from None
        want = ((cfg.layers,) if rule.stacked else ()) + L.full_shape(rule, cfg)
        if tuple(leaf.shape) != want:
            raise CheckpointError(f"params leaf {rule.module}/{rule.name} has shape {tuple(leaf.shape)} but the config "
                                  f"gives {want} (layers={cfg.layers}, d_model={cfg.d_model}, n_vocab={cfg.n_vocab}, "
                                  f"d_ff={cfg.ffn_dim}); save with the config the params were made with")


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)


def _host(x: Any, dtype=None) -> np.ndarray:
    """A host numpy copy (a view for numpy input), floats cast to dtype when given."""
    a = np.asarray(jax.device_get(x))
    if dtype is not None and _is_float(a.dtype):
        a = a.astype(dtype)
    return a


# ================================================================================== save
def save_checkpoint(path: str, state: Any, step: int, cfg: Config, shards: Optional[int] = None, slim: bool = False,
                    aux: Optional[dict] = None, keep_n: Optional[int] = None,
                    keep_every: Optional[int] = None) -> None:
    """Writes `state` (a TrainState, or bare params) as step `step` under the checkpoint folder `path`.

    shards: number of shard folders (default cfg.cores_per_replica). slim: params only, cast to bfloat16 (mtj's
    slim_model.py); a bare params tree or a state without optimizer also writes params only, in their dtype.
    aux: stored as meta["aux"][str(step)] (e.g. {"train_loader": ...}). keep_n / keep_every (default: the config's):
    after the commit, steps older than the last keep_n are removed unless step % keep_every == 0; keep_n None keeps all.
    Test hook: STAR_TEST_CRASH_AT_STEP=N in the environment SIGKILLs the process half-way through writing step N.
    """
    step = int(step)
    hf_format = cfg.is_llama  # the Llama family's steps are HF folders (hf_checkpoint.py); shards do not apply
    shards = 1 if hf_format else int(shards or cfg.cores_per_replica)
    params, opt_state = _split_state(state)
    if not hf_format:
        _check_divisible(cfg, shards)
        _check_params(params, cfg)
    with_opt = opt_state is not None and not slim
    if with_opt:
        adam_count, mu, nu, sched_count = _adam_parts(opt_state)
        if jax.tree.structure(mu) != jax.tree.structure(params):
            raise CheckpointError("Adam mu does not have the structure of the params; was the optimizer made for them?")
    keep_n = cfg.keep_n if keep_n is None else keep_n
    keep_every = (cfg.keep_every or None) if keep_every is None else keep_every
    mesh = _spanning_mesh(params)  # None: every array is in this process (one process, or host arrays)
    if mesh is not None and hf_format:
        raise CheckpointError(f"a {cfg.model_type} checkpoint step is an HF folder whose tensors are whole, which a "
                              f"multi-process run cannot write yet (no host holds every leaf whole); train this "
                              f"model in one process (one host, any number of devices)")
    if mesh is not None and mesh.shape["mp"] != shards:
        raise CheckpointError(f"a multi-process checkpoint is written with one shard per mp slice: shards={shards} but "
                              f"the mesh has mp={mesh.shape['mp']}; save with shards={mesh.shape['mp']} (reshard it "
                              f"afterwards in one process with resharding_example.py)")
    main = mesh is None or jax.process_index() == 0
    from . import distributed

    path = path.rstrip("/")
    step_dir = _join(path, f"step_{step}")
    if main:
        _makedirs(path)
        meta = _read_meta(path)
        had_meta = meta is not None
        meta = meta or {"step": 0, "checkpoints": [], "aux": {}}
        listed = [int(s) for s in meta["checkpoints"]]

        # 1. step N stops being named before its folder is touched; leftovers of crashed saves go
        if step in listed:
            listed.remove(step)
            meta["checkpoints"] = listed
            meta["aux"].pop(str(step), None)
            if listed:
                meta["step"] = listed[-1]
            _write_meta(path, meta)
        stale = {step} | {int(s) for s in meta.get("deleting", [])}
        if had_meta:
            newest = max(listed, default=-1)
            stale |= {int(m.group(1)) for m in map(_STEP_RE.match, _list_dirs(path))
                      if m and int(m.group(1)) > newest and int(m.group(1)) not in listed}
        for s in sorted(stale):
            _rmtree(_join(path, f"step_{s}"))
        for folder in ([step_dir] if hf_format else [_join(step_dir, f"shard_{s}") for s in range(shards)]):
            _makedirs(folder)

    # 2. every file of step N
    if hf_format:
        from . import hf_checkpoint
        t0 = time.time()
        hf_checkpoint.write_step(step_dir, cfg, params, (adam_count, mu, nu, sched_count) if with_opt else None,
                                 step, slim, lambda: _crash_hook(step, step_dir))
        log.info("wrote %s (HF folder%s) in %.1fs", step_dir, " + optimizer" if with_opt else "", time.time() - t0)
        _commit(path, meta, listed, step, aux, keep_n, keep_every)
        return
    leaves = L.leaf_list(cfg.layers, with_opt)
    bounds = L.chunk_bounds(len(leaves))
    cast = ml_dtypes.bfloat16 if slim else None
    sources = {L.PARAMS: params}
    if with_opt:
        sources.update({L.MU: mu, L.NU: nu})
    scalars = {L.STEP: np.asarray(step, np.int32)}
    if with_opt:
        scalars[L.ADAM_COUNT] = _host(adam_count)
        scalars[L.SCHEDULE_COUNT] = _host(sched_count)

    def full_leaf(leaf: L.Leaf) -> np.ndarray:
        if leaf.rule is None:
            return scalars[leaf.group]
        x = sources[leaf.group][leaf.rule.module][leaf.rule.name]
        if leaf.layer is not None:
            x = x[leaf.layer]
        return _host(x, cast if leaf.group == L.PARAMS else None)

    t0 = time.time()
    if mesh is not None:
        distributed.barrier(f"checkpoint step {step}: folder ready")
        _write_own_shards(cfg, mesh, step, step_dir, leaves, bounds, sources, scalars, cast, shards)
        distributed.barrier(f"checkpoint step {step}: all shards written")
        if not main:
            distributed.barrier(f"checkpoint step {step}: committed")
            return
    else:
        _write_all_shards(step, step_dir, leaves, bounds, full_leaf, shards)
    log.info("wrote %s (%d shards, %d leaves each) in %.1fs", step_dir, shards, len(leaves), time.time() - t0)

    _commit(path, meta, listed, step, aux, keep_n, keep_every)
    if mesh is not None:
        distributed.barrier(f"checkpoint step {step}: committed")


def _commit(path: str, meta: dict, listed: List[int], step: int, aux: Optional[dict], keep_n: Optional[int],
            keep_every: Optional[int]) -> None:
    """Steps 3 and 4 of the protocol: meta.json names the step, then old steps are removed."""
    # 3. commit
    listed.append(step)
    meta["aux"][str(step)] = aux or {}
    to_delete = []
    if keep_n is not None:
        old = listed[:-keep_n] if keep_n > 0 else listed[:-1]
        to_delete = [s for s in old if not (keep_every and s % keep_every == 0)]
    meta["checkpoints"] = [s for s in listed if s not in to_delete]
    meta["step"] = step
    for s in to_delete:
        meta["aux"].pop(str(s), None)
    meta["deleting"] = sorted(set(to_delete))
    if not meta["deleting"]:
        del meta["deleting"]
    _write_meta(path, meta)

    # 4. old steps
    if to_delete:
        for s in to_delete:
            log.info("removing checkpoint step %d of %s", s, path)
            _rmtree(_join(path, f"step_{s}"))
        del meta["deleting"]
        _write_meta(path, meta)


def _crash_hook(step: int, step_dir: str) -> None:
    if os.environ.get(CRASH_ENV) == str(step):  # test hook: die mid-save
        log.warning("%s=%d: killing this process in the middle of writing %s", CRASH_ENV, step, step_dir)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _write_all_shards(step: int, step_dir: str, leaves, bounds, full_leaf, shards: int) -> None:
    """One process writes every file of the step from the full leaves."""
    with ThreadPoolExecutor(max_workers=min(16, shards)) as pool:
        for j, (a, b) in enumerate(bounds):
            per_shard = [[] for _ in range(shards)]
            for leaf in leaves[a:b]:
                for s, part in enumerate(L.cut(leaf, full_leaf(leaf), shards)):
                    per_shard[s].append(part)
            list(pool.map(lambda s: _write_npz(_join(step_dir, f"shard_{s}", f"{j}.npz"), per_shard[s]),
                          range(shards)))
            if j == L.PIECES // 2:
                _crash_hook(step, step_dir)


def _spanning_mesh(params: Any):
    """The mesh of params whose arrays span several processes (a multi-process run), else None."""
    for x in jax.tree.leaves(params):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.sharding.mesh
    return None


def _write_own_shards(cfg: Config, mesh, step: int, step_dir: str, leaves, bounds, sources, scalars, cast, shards: int) -> None:
    """This process's part of a multi-process save: the folders shard_s whose mp slice s sits on one of its devices
    at dp row 0. Each leaf is read from that device alone (the layer asked for, sliced there), never gathered."""
    from .sharding import leaf_spec
    from jax.sharding import NamedSharding
    grid = np.moveaxis(mesh.devices, [mesh.axis_names.index("dp"), mesh.axis_names.index("mp")], [0, 1])
    writer_of = [grid[0, s] for s in range(shards)]
    own = [s for s in range(shards) if writer_of[s].process_index == jax.process_index()]
    first_file = True

    def ckpt_layout(leaf: L.Leaf, x: jax.Array) -> jax.Array:
        """x in the mp-only layout of its param (resharded leaf by leaf when it is laid out otherwise)."""
        target = NamedSharding(mesh, leaf_spec(leaf.rule.module, leaf.rule.name))
        if x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.device_put(x, target)

    for j, (a, b) in enumerate(bounds):
        per_shard: Dict[int, List[np.ndarray]] = {s: [] for s in own}
        resharded: Dict[Tuple[str, str, str], jax.Array] = {}  # within one file's leaves
        for leaf in leaves[a:b]:
            if leaf.rule is None:
                for s in own:
                    per_shard[s].append(scalars[leaf.group])
                continue
            rule = leaf.rule
            key = (leaf.group, rule.module, rule.name)
            if key not in resharded:
                resharded[key] = ckpt_layout(leaf, sources[leaf.group][rule.module][rule.name])
            x = resharded[key]
            by_device = {shard.device: shard.data for shard in x.addressable_shards}
            dtype = cast if leaf.group == L.PARAMS else None
            for s in own:
                local = by_device[writer_of[s]]  # [L?, ...] this device's slice
                part = _host(local[leaf.layer] if leaf.layer is not None else local, dtype)
                if rule.kind == L.SPLIT:
                    if part.shape != L.shard_shape(rule, cfg, shards):  # the layout is leaf_spec's: a bug if not
                        raise AssertionError(f"{leaf.our_path}: device slice {part.shape}, expected "
                                             f"{L.shard_shape(rule, cfg, shards)}")
                else:  # replicated: the device holds the whole leaf; shard s gets mtj's part of it
                    part = L.cut(leaf, part, shards)[s]
                per_shard[s].append(part)
        for s in own:
            _write_npz(_join(step_dir, f"shard_{s}", f"{j}.npz"), per_shard[s])
            if first_file:
                first_file = False
                _crash_hook(step, step_dir)
        if not own and j == L.PIECES // 2:
            _crash_hook(step, step_dir)


# ================================================================================== load
def _resolve(path: str, step: Optional[int]) -> Tuple[str, int, dict]:
    """(step folder, step, aux) for a checkpoint folder with meta.json, or a step_N folder itself."""
    path = path.rstrip("/")
    meta = _read_meta(path)
    if meta is not None:
        listed = [int(s) for s in meta["checkpoints"]]
        if step is None:
            if not listed:
                raise CheckpointError(f"{path}/meta.json names no checkpoint yet")
            step = listed[-1]
        elif step not in listed:
            raise CheckpointError(f"step {step} is not a committed checkpoint of {path} (meta.json lists {listed}); "
                                  f"a step_{step} folder that meta.json does not name may be incomplete")
        return _join(path, f"step_{step}"), step, dict(meta["aux"].get(str(step), {}))
    from .hf_checkpoint import is_hf_step
    if "shard_0" in _list_dirs(path) or is_hf_step(path):  # a step folder (e.g. the released step_383500/)
        m = re.search(r"step_(\d+)$", path)
        if step is not None and m and int(m.group(1)) != step:
            raise CheckpointError(f"{path} is the folder of step {m.group(1)}, not {step}")
        return path, (step if step is not None else (int(m.group(1)) if m else -1)), {}
    if step is not None and ("shard_0" in _list_dirs(_join(path, f"step_{step}")) or
                             is_hf_step(_join(path, f"step_{step}"))):
        log.warning("%s has no meta.json; loading step_%d without knowing whether it is complete", path, step)
        return _join(path, f"step_{step}"), step, {}
    raise CheckpointError(f"no checkpoint at {path}: expected {path}/meta.json (a checkpoint folder) or "
                          f"{path}/shard_0/ (a step folder such as step_383500/)")


def _n_shards(step_dir: str) -> int:
    ids = sorted(int(m.group(1)) for m in map(_SHARD_RE.match, _list_dirs(step_dir)) if m)
    if not ids or ids != list(range(len(ids))):
        raise CheckpointError(f"{step_dir} holds shard folders {ids}; expected shard_0 .. shard_(S-1)")
    return len(ids)


def _shape_error(leaf: L.Leaf, got: Tuple[int, ...], cfg: Config, shards: int, where: str) -> CheckpointError:
    rule = leaf.rule
    want = L.shard_shape(rule, cfg, shards)
    msg = (f"checkpoint leaf '{leaf.our_path}' (mtj '{leaf.mtj_path}') in {where} has shape {got} per shard, "
           f"but the config expects {want} per shard with {shards} shards")
    if len(got) == len(want):
        for axis, (g, w) in enumerate(zip(got, want)):
            if g != w:
                key = rule.dims[axis]
                implied = g * shards if axis == rule.axis else g
                return CheckpointError(f"{msg}: axis {axis} is {key} ({key}={L.dim_value(cfg, key)} in the config, "
                                       f"{implied} in the checkpoint); set '{key}': {implied} in the config")
    return CheckpointError(msg)


def _member_shapes(path: str) -> List[Tuple[int, ...]]:
    """Shapes of arr_0, arr_1, ... of an npz from the array headers only."""
    with _open(path, "rb") as f:
        with zipfile.ZipFile(f) as zf:
            names = sorted(zf.namelist(), key=lambda n: int(re.sub(r"\D", "", n) or 0))
            shapes = []
            for name in names:
                with zf.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, _ = read(member)
                    shapes.append(tuple(shape))
    return shapes


def _missing_shards(step_dir: str, leaves, bounds, cfg: Config, shards: int) -> Optional[CheckpointError]:
    """The error for a checkpoint whose shard folders are partly missing: every split leaf in shard_0 is the same
    fraction 1/k of what `shards` shards would hold (a wrong config key changes only the leaves of that key)."""
    try:
        ratios = set()
        for j, (a, b) in enumerate(bounds):
            for leaf, got in zip(leaves[a:b], _member_shapes(_join(step_dir, "shard_0", f"{j}.npz"))):
                rule = leaf.rule
                if rule is None or rule.axis is None:
                    continue
                want = L.shard_shape(rule, cfg, shards)
                if len(got) != len(want) or any(g != w for i, (g, w) in enumerate(zip(got, want)) if i != rule.axis):
                    return None
                if not got[rule.axis] or want[rule.axis] % got[rule.axis]:
                    return None
                ratios.add(want[rule.axis] // got[rule.axis])
    except Exception:  # only a better message is at stake
        return None
    if len(ratios) != 1 or ratios == {1}:
        return None
    implied = shards * ratios.pop()
    return CheckpointError(f"{step_dir} holds shard folders shard_0 .. shard_{shards - 1}, but its files are cut for "
                           f"{implied} shards: shard folders are missing; copy all of shard_0 .. "
                           f"shard_{implied - 1} (the config is fine)")


def _opt_state_from(cfg: Config, params: Any, mu: Any, nu: Any, adam_count: Any, sched_count: Any) -> Any:
    """Our optax chain state (train.make_optimizer) holding the loaded Adam moments and counters."""
    from .train import make_optimizer
    template = jax.eval_shape(make_optimizer(cfg).init, params)

    def fill(x):
        if isinstance(x, optax.ScaleByAdamState):
            return x._replace(count=np.asarray(adam_count, x.count.dtype), mu=mu, nu=nu)
        if isinstance(x, optax.ScaleByScheduleState):
            return x._replace(count=np.asarray(sched_count, x.count.dtype))
        raise CheckpointError(f"optimizer state leaf {x} has no place in a v1 checkpoint; update checkpoint.py")

    return jax.tree.map(fill, template, is_leaf=_is_opt_node)


def load_checkpoint(path: str, cfg: Config, step: Optional[int] = None, with_opt: bool = True,
                    forget_bad: bool = False, shardings: Any = None,
                    param_dtype: Any = None) -> Tuple[Any, Optional[Any], int, dict]:
    """Reads a v1 checkpoint into host numpy arrays in our layout, from any number of shards (a Llama-family config:
    its HF-folder steps, hf_checkpoint.py; a plain HF folder of that family reads as a params-only step).

    path: a checkpoint folder with meta.json (step None: its latest committed step), or a step_N folder itself
    (e.g. the released GPT-J-6B weights). Returns (params, opt_state or None, step, aux); opt_state is None when
    with_opt is False or the files hold params only. Arrays keep the files' dtypes (bfloat16 for slim files).

    With step None, a latest step whose files cannot be read (a damaged or truncated .npz) falls back, with a
    warning naming the bad file, to the newest committed step that loads. forget_bad (the training loop, which
    holds the folder's lock): meta.json also stops naming the bad steps, so training redoes them.

    shardings (a TrainState of NamedShardings, e.g. Trainer.shardings; local folders): the arrays come back as
    global jax.Arrays in those shardings instead, each process reading from the files only the parts its own devices
    hold, leaf by leaf (a multi-process resume); params cast to param_dtype when given.
    """
    path = path.rstrip("/")
    meta = _read_meta(path) if step is None else None
    listed = [int(s) for s in meta["checkpoints"]] if meta else []
    if step is not None or len(listed) < 2:
        return _load_step(path, cfg, step, with_opt, shardings, param_dtype)
    bad: List[int] = []
    for candidate in reversed(listed):
        try:
            out = _load_step(path, cfg, candidate, with_opt, shardings, param_dtype)
        except CorruptCheckpointError as e:
            log.warning("checkpoint step %d of %s cannot be loaded: %s; falling back to the previous committed "
                        "step", candidate, path, e)
            bad.append(candidate)
            if candidate == listed[0]:
                raise CorruptCheckpointError(f"no committed step of {path} loads (tried {bad}); the last error: "
                                             f"{e}") from e
            continue
        if bad:
            log.warning("loaded step %d of %s instead of the damaged latest step %d", candidate, path, bad[0])
            if forget_bad:
                meta["checkpoints"] = [s for s in listed if s not in bad]
                meta["step"] = candidate
                for s in bad:
                    meta["aux"].pop(str(s), None)
                _write_meta(path, meta)
                log.warning("meta.json of %s no longer names the damaged steps %s; they will be trained again",
                            path, bad)
        return out
    raise AssertionError("unreachable")  # pragma: no cover


def _layout(step_dir: str, cfg: Config) -> Tuple[int, List[L.Leaf], List[Tuple[int, int]], bool]:
    """(shards, leaves, chunk bounds, has_opt) of a step folder, checked against the config."""
    shards = _n_shards(step_dir)
    counts = [_npz_len(_join(step_dir, "shard_0", f"{j}.npz")) for j in range(L.PIECES)]
    n = sum(counts)
    layouts = L.infer_layout(n)
    mine = [lay for lay in layouts if lay[0] == cfg.layers]
    if not mine:
        found = " or ".join(f"a {'full' if o else 'params-only'} checkpoint of {ly} layers" for ly, o in layouts)
        raise CheckpointError(f"{step_dir} holds {n} leaves per shard ({found or 'not a v1 layout of this model'}); "
                              f"the config says layers={cfg.layers}, i.e. {L.leaf_count(cfg.layers, False)} (params "
                              f"only) or {L.leaf_count(cfg.layers, True)} (with optimizer) leaves"
                              + (f"; set 'layers': {layouts[0][0]} in the config" if layouts else ""))
    has_opt = mine[0][1]
    leaves = L.leaf_list(cfg.layers, has_opt)
    bounds = L.chunk_bounds(n)
    if counts != [b - a for a, b in bounds]:
        raise CheckpointError(f"{step_dir}/shard_0 files hold {counts} leaves; mtj's 16-way split of {n} leaves "
                              f"gives {[b - a for a, b in bounds]}")
    return shards, leaves, bounds, has_opt


def _load_step(path: str, cfg: Config, step: Optional[int] = None, with_opt: bool = True,
               shardings: Any = None, param_dtype: Any = None) -> Tuple[Any, Optional[Any], int, dict]:
    step_dir, step, aux = _resolve(path, step)
    if cfg.is_llama:
        return _load_hf_step(step_dir, step, aux, cfg, with_opt, shardings, param_dtype)
    shards, leaves, bounds, has_opt = _layout(step_dir, cfg)
    if shardings is not None and not _is_gcs(step_dir):
        return _load_step_sharded(step_dir, step, aux, cfg, shards, leaves, bounds, with_opt and has_opt,
                                  shardings, param_dtype)
    want_opt = with_opt and has_opt
    wanted_groups = {L.PARAMS, L.STEP} | ({L.MU, L.NU, L.ADAM_COUNT, L.SCHEDULE_COUNT} if want_opt else set())

    trees: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {L.PARAMS: {}, L.MU: {}, L.NU: {}}
    scalars: Dict[str, np.ndarray] = {}

    def put(leaf: L.Leaf, value: np.ndarray) -> None:
        if leaf.rule is None:
            scalars[leaf.group] = value
            return
        rule = leaf.rule
        module = trees[leaf.group].setdefault(rule.module, {})
        if leaf.layer is None:
            module[rule.name] = value
            return
        if rule.name not in module:
            module[rule.name] = np.empty((cfg.layers,) + value.shape, value.dtype)
        module[rule.name][leaf.layer] = value

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=min(16, shards)) as pool:
        for j, (a, b) in enumerate(bounds):
            local = [k - a for k in range(a, b) if leaves[k].group in wanted_groups]
            if not local:
                continue
            files = [_join(step_dir, f"shard_{s}", f"{j}.npz") for s in range(shards)]
            try:
                per_shard = list(pool.map(lambda f: _read_npz(f, local), files))
            except KeyError as e:
                raise CheckpointError(f"a file of chunk {j} in {step_dir} lacks {e}; shards hold different "
                                      f"layouts") from e
            for k in local:
                leaf = leaves[a + k]
                parts = [per_shard[s][k] for s in range(shards)]
                for s, p in enumerate(parts):
                    if leaf.rule is None:
                        ok = p.shape == ()
                    else:
                        ok = p.shape == L.shard_shape(leaf.rule, cfg, shards)
                    if not ok:
                        if leaf.rule is None:
                            raise CheckpointError(f"checkpoint leaf '{leaf.our_path}' (mtj '{leaf.mtj_path}') in "
                                                  f"{files[s]} has shape {p.shape}; expected a scalar")
                        raise _missing_shards(step_dir, leaves, bounds, cfg, shards) or \
                            _shape_error(leaf, p.shape, cfg, shards, files[s])
                put(leaf, L.join(leaf, parts))
    log.info("read %s (%d shards) in %.1fs", step_dir, shards, time.time() - t0)

    params = trees[L.PARAMS]
    opt_state = None
    if want_opt:
        opt_state = _opt_state_from(cfg, params, trees[L.MU], trees[L.NU], scalars[L.ADAM_COUNT],
                                    scalars[L.SCHEDULE_COUNT])
    if step < 0:
        step = int(scalars[L.STEP])
    return params, opt_state, step, aux


def _load_hf_step(step_dir: str, step: int, aux: dict, cfg: Config, with_opt: bool, shardings: Any,
                  param_dtype: Any) -> Tuple[Any, Optional[Any], int, dict]:
    """_load_step for a Llama-family step (an HF folder, hf_checkpoint.py). With shardings the host arrays are
    placed leaf by leaf, each device taking its slice (jax.make_array_from_callback)."""
    from . import hf_checkpoint
    if not hf_checkpoint.is_hf_step(step_dir):
        raise CheckpointError(f"{step_dir} holds no config.json: the config is a {cfg.model_type} model, whose "
                              f"checkpoint steps are HF folders; is this a GPT-J checkpoint? (set model_type)")
    t0 = time.time()
    params, opt, file_step = hf_checkpoint.read_step(step_dir, cfg, with_opt)
    log.info("read %s (HF folder%s) in %.1fs", step_dir, " + optimizer" if opt else "", time.time() - t0)
    if param_dtype is not None:
        params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    opt_state = None
    if opt is not None:
        adam_count, mu, nu, sched_count = opt
        if shardings is not None:
            _, mu_sh, nu_sh, _ = _adam_parts(shardings.opt_state)
            mu, nu = _placed(mu, mu_sh), _placed(nu, nu_sh)
        opt_state = _opt_state_from(cfg, params, mu, nu, adam_count, sched_count)
    if shardings is not None:
        params = _placed(params, shardings.params)
    return params, opt_state, (file_step if step < 0 else step), aux


def _placed(tree: Any, shardings: Any) -> Any:
    """Host arrays -> global jax.Arrays in `shardings`, each device given only its slice."""
    return jax.tree.map(lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda index: x[index]), tree,
                        shardings)


def _load_step_sharded(step_dir: str, step: int, aux: dict, cfg: Config, shards: int, leaves: List[L.Leaf],
                       bounds, want_opt: bool, shardings: Any, param_dtype: Any) -> Tuple[Any, Any, int, dict]:
    """load_checkpoint with shardings: every leaf is built by jax.make_array_from_callback, whose callback reads, for
    one of this process's devices, only the files of the shards its slice overlaps (one npz member each)."""
    where = {}  # (group, module, name, layer) -> (file j, member k)
    for j, (a, b) in enumerate(bounds):
        for k, leaf in enumerate(leaves[a:b]):
            rule = leaf.rule
            where[(leaf.group, rule.module if rule else None, rule.name if rule else None, leaf.layer)] = (j, k)
    files: Dict[Tuple[int, int], Any] = {}

    def member(j: int, s: int, k: int, leaf: L.Leaf) -> np.ndarray:
        f = _join(step_dir, f"shard_{s}", f"{j}.npz")
        try:
            if (j, s) not in files:
                files[(j, s)] = np.load(f, allow_pickle=False)
            x = _fix_dtype(files[(j, s)][f"arr_{k}"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise CorruptCheckpointError(f"cannot read {f}: {_why(e)}; the file is damaged (truncated or "
                                         f"overwritten)") from e
        want = () if leaf.rule is None else L.shard_shape(leaf.rule, cfg, shards)
        if x.shape != want:
            raise (_missing_shards(step_dir, leaves, bounds, cfg, shards) if leaf.rule is not None else None) or \
                (_shape_error(leaf, x.shape, cfg, shards, f) if leaf.rule is not None else
                 CheckpointError(f"checkpoint leaf '{leaf.our_path}' in {f} has shape {x.shape}; expected a scalar"))
        return x

    def part(leaf: L.Leaf, rest: tuple) -> np.ndarray:
        """rest (slices of the unstacked leaf) of the full leaf, from the shards it overlaps."""
        rule = leaf.rule
        j, k = where[(leaf.group, rule.module, rule.name, leaf.layer)]
        if rule.kind == L.SPLIT:
            ax, n = rule.axis, L.full_shape(rule, cfg)[rule.axis]
            w = n // shards
            lo, hi, _ = rest[ax].indices(n)
            first, last = lo // w, (hi - 1) // w
            x = np.concatenate([member(j, s, k, leaf) for s in range(first, last + 1)], axis=ax)
            rest = rest[:ax] + (slice(lo - first * w, hi - first * w),) + rest[ax + 1:]
            return x[rest]
        summed = rule.kind == L.SUMMED and leaf.group == L.PARAMS
        return L.join(leaf, [member(j, s, k, leaf) for s in (range(shards) if summed else [0])])[rest]

    def scalar_leaf(group: str) -> np.ndarray:  # counters and the step: the same on every shard
        j, k = where[(group, None, None, None)]
        return member(j, 0, k, L.Leaf(group))

    def build(group: str, rule, sharding, dtype) -> jax.Array:
        full = L.full_shape(rule, cfg)
        shape = ((cfg.layers,) if rule.stacked else ()) + full
        seen: Dict[str, np.ndarray] = {}  # replicas of one slice are read once

        def cb(index):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            key = repr(index)
            if key not in seen:
                if rule.stacked:
                    x = np.stack([part(L.Leaf(group, rule, i), index[1:]) for i in range(cfg.layers)[index[0]]])
                else:
                    x = part(L.Leaf(group, rule, None), index)
                seen[key] = x.astype(dtype) if dtype is not None and _is_float(x.dtype) else x
            return seen[key]
        return jax.make_array_from_callback(shape, sharding, cb)

    def tree(group: str, tree_shardings: Any, dtype=None) -> Dict[str, Dict[str, jax.Array]]:
        out: Dict[str, Dict[str, jax.Array]] = {}
        for rule in L.RULES:
            out.setdefault(rule.module, {})[rule.name] = build(group, rule, tree_shardings[rule.module][rule.name],
                                                               dtype)
        return out

    t0 = time.time()
    try:
        params = tree(L.PARAMS, shardings.params, param_dtype)
        opt_state = None
        if want_opt:
            _, mu_sh, nu_sh, _ = _adam_parts(shardings.opt_state)
            scalar = {g: scalar_leaf(g) for g in (L.ADAM_COUNT, L.SCHEDULE_COUNT)}
            opt_state = _opt_state_from(cfg, params, tree(L.MU, mu_sh), tree(L.NU, nu_sh), scalar[L.ADAM_COUNT],
                                        scalar[L.SCHEDULE_COUNT])
        if step < 0:
            step = int(scalar_leaf(L.STEP))
    finally:
        for f in files.values():
            f.close()
    log.info("read this process's parts of %s (%d shards) in %.1fs", step_dir, shards, time.time() - t0)
    return params, opt_state, step, aux


def reshard(in_path: str, out_path: str, shards_out: int, cfg: Config, step: Optional[int] = None) -> None:
    """Rewrites a checkpoint with `shards_out` shards (same step, dtypes, optimizer state and aux)."""
    from .train import TrainState
    params, opt_state, step, aux = load_checkpoint(in_path, cfg, step=step, with_opt=True)
    state = params if opt_state is None else TrainState(params, opt_state, np.asarray(step, np.int32))
    save_checkpoint(out_path, state, step, cfg, shards=shards_out, aux=aux, keep_n=None, keep_every=None)
