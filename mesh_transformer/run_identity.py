"""Run identity: a run folder remembers what defines its results, and a rerun with other settings refuses.

Rerunning a command into a folder resumes it. That is right when the rerun is the same run, and wrong when the flags
or config changed: the folder would hold a mix of two runs under one name (a `results.md` claiming the new settings
for iterations made with the old ones, answers of another checkpoint reported as this one's). So every writer of a
run folder records, on its first start, `{folder}/run_identity.json`:

    {"kind": "device_train", "fields": {...what defines the results...}, "code_version": "v0.3-12-gabc1234",
     "created": "...", "history": [...]}

and on every later start compares its own fields with the recorded ones. A difference refuses to start, listing each
differing field (recorded -> now), unless the user says what they want:
  --force-new      start over in that folder (its previous outputs are deleted first; the lock stays held);
  --resume-anyway  continue with the new settings; the difference is appended to "history" in the identity file.
The code version (`git describe`) is recorded and a change is logged, but does not refuse: resuming after a pull is
normal, and the crash-safety tests show resumes are exact within one version.

Fields are plain JSON values; keys that do not change results (paths of logs, progress bars, step counts that only
extend a run such as total_steps / n_iters, checkpoint cadence) are left out by the callers.

The training folder check (`check_training_folder`) also refuses a model_dir that holds step folders but no readable
meta.json: starting fresh there would overwrite those steps one by one. `--recover-meta` rebuilds meta.json from the
complete steps (`recover_meta`); the loader position of each recovered step is recomputed by replaying the loader.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

log = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORCE_FLAGS = "--force-new (start over in this folder, deleting its outputs) or --resume-anyway (continue with the " \
              "new settings)"

# Config keys that do not change what a training run computes step by step: names, logging, paths, cadence of
# checkpoints and validation, the run's length (extending total_steps continues the same run), the device layout,
# and how the same math is scheduled (remat, scanned layers, the attention implementation and its block size: equal to
# fp32 rounding, tests/test_attention.py; a folder started before attention_impl defaulted to "auto" still resumes).
CONFIG_KEYS_NOT_IN_IDENTITY = frozenset({
    "name", "wandb_project", "comment", "bucket", "model_dir", "total_steps", "ckpt_every", "keep_every", "keep_n",
    "val_every", "val_batches", "val_set", "eval_harness_tasks", "tpu_size", "cores_per_replica", "remat",
    "scan_layers", "attention_impl", "attention_block_size", "target_save", "target_save_folder"})


class IdentityError(ValueError):
    """A rerun whose settings differ from the folder's recorded run; the message lists the differences."""


# ------------------------------------------------------------------------------------------------ facts
@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`git describe --always --dirty --tags` of this checkout, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty", "--tags"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def config_fields(cfg: Any, exclude: Iterable[str] = CONFIG_KEYS_NOT_IN_IDENTITY) -> Dict[str, Any]:
    """The result-defining keys of a Config (or a dict of config keys)."""
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: raw[k] for k in sorted(raw) if k not in set(exclude)}


def config_hash(fields: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(obj, dict):
        out: Dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def differences(recorded: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """'key: recorded -> now' for every differing (dotted) key."""
    a, b = _flatten(json.loads(json.dumps(recorded, default=str))), _flatten(json.loads(json.dumps(now, default=str)))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


# ------------------------------------------------------------------------------------------------ storage
def _io():
    from . import checkpoint as ckpt
    return ckpt


def _path(folder: str, name: str = IDENTITY_FILE) -> str:
    return _io()._join(str(folder), name)


def read_identity(folder: str, name: str = IDENTITY_FILE) -> Optional[dict]:
    ckpt = _io()
    path = _path(folder, name)
    if not ckpt._exists(path):
        return None
    try:
        with ckpt._open(path, "r") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("fields"), dict):
            raise ValueError("no 'fields' object")
    except ValueError as e:
        raise IdentityError(f"run identity file {path} is damaged ({e}); delete it to adopt the folder as this run, "
                            f"or pass --force-new to start over there") from None
    return data


def write_identity(folder: str, data: dict, name: str = IDENTITY_FILE) -> None:
    ckpt = _io()
    ckpt._makedirs(str(folder))
    ckpt._write_text_atomic(_path(folder, name), json.dumps(data, indent=1, sort_keys=True, default=str))


def check_identity(folder: str, kind: str, fields: Dict[str, Any], *, what: str, force_new: bool = False,
                   resume_anyway: bool = False, has_outputs: Callable[[], bool] = lambda: False,
                   clear: Optional[Callable[[], None]] = None, adopt_unrecorded: bool = True,
                   name: str = IDENTITY_FILE, where: Optional[str] = None) -> str:
    """Records or checks the identity of `folder`; returns "new", "same", "forced" or "resumed-anyway".

    has_outputs(): whether the folder already holds results. With no identity file, a folder with outputs is adopted
    (recorded as this run: folders made before identities existed) when adopt_unrecorded, else refused.
    clear(): deletes the folder's outputs, for force_new."""
    shown_as = where or folder  # the thing named in messages (a folder, or one file in it)
    if force_new and resume_anyway:
        raise IdentityError("--force-new and --resume-anyway exclude each other; pass one")
    now = {"kind": kind, "fields": fields, "code_version": code_version(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "history": []}
    recorded = read_identity(folder, name)
    if recorded is not None and not has_outputs():  # that run stopped before it made anything: not binding
        recorded = None
    if force_new:
        if (recorded is not None or has_outputs()) and clear is not None:
            log.warning("--force-new: deleting the previous outputs of %s %s", what, shown_as)
            clear()
        write_identity(folder, now, name)
        return "forced"
    if recorded is None:
        if has_outputs() and not adopt_unrecorded and not resume_anyway:
            raise IdentityError(f"{what} {shown_as} holds outputs of a run that recorded no identity, so they may come "
                                f"from other settings; pass {FORCE_FLAGS}, or use another folder")
        if has_outputs():
            log.info("%s %s has no %s: recording this run's identity for it", what, shown_as, name)
        write_identity(folder, now, name)
        return "new"
    diff = differences(recorded.get("fields", {}), fields)
    if recorded.get("kind") != kind:
        diff.insert(0, f"kind: {recorded.get('kind')!r} -> {kind!r}")
    if recorded.get("code_version") != now["code_version"]:
        log.info("%s %s was started by code version %s; this is %s", what, shown_as, recorded.get("code_version"),
                 now["code_version"])
    if not diff:
        return "same"
    if not resume_anyway:
        shown = "; ".join(diff[:12]) + (f"; ... {len(diff) - 12} more" if len(diff) > 12 else "")
        raise IdentityError(f"{what} {shown_as} holds a run with other settings ({_path(folder, name)}): {shown}. "
                            f"Rerun with the recorded settings to resume it, pass {FORCE_FLAGS}, or use another "
                            f"folder")
    log.warning("--resume-anyway: %s %s continues with other settings: %s", what, shown_as, "; ".join(diff))
    recorded.setdefault("history", []).append({"at": now["created"], "code_version": now["code_version"],
                                               "resumed_anyway_with": diff})
    recorded["fields"] = fields
    write_identity(folder, recorded, name)
    return "resumed-anyway"


# ------------------------------------------------------------------------------------------------ training folders
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_folders(ckpt_path: str) -> List[int]:
    """Steps with a step_N/shard_0 folder (v1) or a step_N/config.json (an HF step, hf_checkpoint) under ckpt_path."""
    ckpt = _io()
    from .hf_checkpoint import is_hf_step
    steps = []
    for name in ckpt._list_dirs(ckpt_path):
        m = _STEP_RE.match(name)
        folder = ckpt._join(ckpt_path, name)
        if m and ("shard_0" in ckpt._list_dirs(folder) or is_hf_step(folder)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def complete_steps(ckpt_path: str, cfg: Any) -> List[int]:
    """Steps whose every shard folder holds all 16 readable npz files with the leaf counts of this config; an HF step
    (Llama family) is complete when it reads."""
    from . import mtj_layout as L
    from . import hf_checkpoint
    ckpt = _io()
    good = []
    for step in step_folders(ckpt_path):
        step_dir = ckpt._join(ckpt_path, f"step_{step}")
        try:
            if getattr(cfg, "is_llama", False):
                hf_checkpoint.read_step(step_dir, cfg, with_opt=True)
                good.append(step)
                continue
            shards = ckpt._n_shards(step_dir)
            counts = None
            for s in range(shards):
                mine = [ckpt._npz_len(ckpt._join(step_dir, f"shard_{s}", f"{j}.npz")) for j in range(L.PIECES)]
                if counts is not None and mine != counts:
                    raise ValueError("shards differ")
                counts = mine
            if not any(lay[0] == cfg.layers for lay in L.infer_layout(sum(counts))):
                raise ValueError("layout")
        except (ValueError, OSError) as e:
            log.warning("step %d of %s is not complete (%s); not recovered", step, ckpt_path, e)
            continue
        good.append(step)
    return good


def _loader_state_after(loader_factory: Optional[Callable[[], Any]], steps: int) -> Optional[dict]:
    """The train loader's state after `steps` batches from the start (a run that started fresh or from
    --tune-model-path took exactly that many)."""
    if loader_factory is None:
        return None
    loader = loader_factory()
    try:
        for _ in range(steps):
            next(loader)
        return loader.get_state()
    finally:
        loader.close()


def recover_meta(ckpt_path: str, cfg: Any, loader_factory: Optional[Callable[[], Any]] = None) -> List[int]:
    """Rebuilds {ckpt_path}/meta.json from its complete step folders; returns the recovered steps."""
    ckpt = _io()
    steps = complete_steps(ckpt_path, cfg)
    if not steps:
        raise IdentityError(f"--recover-meta: {ckpt_path} holds no complete step folder (every shard_s/0..15.npz "
                            f"readable); nothing to recover. Use a new model_dir, or --force-new to start over there")
    aux = {}
    for s in steps:
        state = _loader_state_after(loader_factory, s)
        aux[str(s)] = {"train_loader": state, "recovered": True} if state else {"recovered": True}
    meta_path = ckpt._join(ckpt_path, "meta.json")
    if ckpt._exists(meta_path):
        broken = meta_path + f".broken-{int(time.time())}"
        with ckpt._open(meta_path, "rb") as f:
            data = f.read()
        with ckpt._open(broken, "wb") as f:
            f.write(data)
        log.warning("kept the unreadable meta.json as %s", broken)
    ckpt._write_meta(ckpt_path, {"step": steps[-1], "checkpoints": steps, "aux": aux})
    log.warning("--recover-meta: rebuilt %s naming steps %s (latest %d)", meta_path, steps, steps[-1])
    return steps


def _meta_readable(ckpt_path: str) -> Optional[str]:
    """None when meta.json is absent or readable, else why it cannot be read."""
    ckpt = _io()
    try:
        ckpt._read_meta(ckpt_path)
    except ckpt.CheckpointError as e:
        return str(e)
    return None


def clear_training_folder(ckpt_path: str, metrics_path: Optional[str] = None) -> None:
    """Deletes meta.json, every step_N folder, the identity file and the metrics file (the lock stays)."""
    ckpt = _io()
    for name in ckpt._list_dirs(ckpt_path):
        if _STEP_RE.match(name):
            ckpt._rmtree(ckpt._join(ckpt_path, name))
    for name in ("meta.json", IDENTITY_FILE):
        path = ckpt._join(ckpt_path, name)
        if ckpt._exists(path):
            _delete(path)
    if metrics_path and os.path.exists(metrics_path):
        os.remove(metrics_path)


def _delete(path: str) -> None:
    ckpt = _io()
    if ckpt._is_gcs(path):
        bucket, name = ckpt._split_gcs(path)
        ckpt._gcs_client().bucket(bucket).blob(name).delete()
    else:
        os.remove(path)


def training_fields(cfg: Any, options: Any) -> Dict[str, Any]:
    """What defines a training run's results: the config's result keys (and their hash), where it starts from
    (a checkpoint path and step, params given by the caller, or a seeded random init) and the code version."""
    ckpt = _io()
    fields = config_fields(cfg)
    start: Dict[str, Any]
    if getattr(options, "tune_model_path", None):
        path = options.tune_model_path.rstrip("/")
        try:
            step = ckpt.latest_step(path)
        except ckpt.CheckpointError:
            step = None
        if step is None:
            m = re.search(r"step_(\d+)$", path)
            step = int(m.group(1)) if m else None
        start = {"from": "checkpoint", "path": path, "step": step, "fresh_opt": bool(options.fresh_opt)}
    elif getattr(options, "init_params", None) is not None:
        start = {"from": "params given by the caller"}
    else:
        start = {"from": "random init", "seed": int(getattr(options, "seed", 0))}
    out = {"config_hash": config_hash(fields), "config": fields, "start": start,
           "slim_final": bool(getattr(options, "slim_final", False))}
    if getattr(options, "anneal_steps", None) is not None:  # a per-run schedule horizon (STaR's per fine-tune)
        out["anneal_steps"] = options.anneal_steps
    return out


def check_training_folder(cfg: Any, options: Any, ckpt_path: str, metrics_path: Optional[str] = None,
                          loader_factory: Optional[Callable[[], Any]] = None) -> str:
    """device_train.py / finetune.train(): refuses a model_dir with steps but no readable meta.json (unless
    recover_meta), then records or checks the run identity (force_new / resume_anyway from options)."""
    ckpt = _io()
    force_new = bool(getattr(options, "force_new", False))
    resume_anyway = bool(getattr(options, "resume_anyway", False))
    recover = bool(getattr(options, "recover_meta", False))
    steps = step_folders(ckpt_path)
    meta_problem = _meta_readable(ckpt_path)
    has_meta = meta_problem is None and ckpt._exists(ckpt._join(ckpt_path, "meta.json"))
    if not force_new and steps and not has_meta:
        why = meta_problem or f"{ckpt._join(ckpt_path, 'meta.json')} is missing"
        if not recover:
            raise IdentityError(f"model_dir {ckpt_path} holds step folders {steps[-5:]} but {why}; starting fresh "
                                f"would overwrite them. Pass --recover-meta to rebuild meta.json from the complete "
                                f"steps and resume, or --force-new to start over there, or point model_dir at a new "
                                f"folder")
        recover_meta(ckpt_path, cfg, loader_factory)
    elif meta_problem and not force_new:
        raise IdentityError(f"{meta_problem}")

    def has_outputs() -> bool:
        return bool(steps) or has_meta

    return check_identity(ckpt_path, "train", training_fields(cfg, options), what="model_dir", force_new=force_new,
                          resume_anyway=resume_anyway, has_outputs=has_outputs,
                          clear=lambda: clear_training_folder(ckpt_path, metrics_path))
