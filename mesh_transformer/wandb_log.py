"""Weights & Biases logging for device_train.py and iteration_train.py, as mesh-transformer-jax and STaR logged
their runs (`wandb.init(project=..., name=config name, config=...)`, then the training metrics every step).

Optional in both senses: off unless a CLI sets `--wandb-mode offline|online` (default disabled), and `wandb` is
imported only then. One run per process: `configure()` (from the CLI flags) says whether and where; the run starts
at the first thing logged. What it logs is what the console and metrics.jsonl already carry:
  * every training step (`log_train`, called by finetune.MetricsWriter): train/loss, train/ce, train/lr,
    train/grad_norm, train/tokens_per_s, train/mfu, val/<set>/loss, against train/global_step (all steps of the
    process: a STaR run's fine-tunes follow one another) with train/step, the step within its fine-tune;
  * every STaR iteration (`log_iteration`): the results.md row (star/steps, star/dev_accuracy/<class>,
    star/train/<key>, ...) against star/iteration;
  * at the end (`log_files`): results.md, accuracy.png, results.json as one artifact.
`read_history(run_dir)` reads the logged rows back from an offline run's `.wandb` file (no network, no account).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import struct
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

MODES = ("disabled", "offline", "online")
_TRAIN_KEYS = ("loss", "ce", "lr", "grad_norm", "tokens_per_s", "mfu")


class _State:
    project: Optional[str] = None
    mode: str = "disabled"
    dir: Optional[str] = None
    name: Optional[str] = None
    config: Dict[str, Any] = {}
    run: Any = None
    global_step: int = 0
    failed: bool = False


_S = _State()


def add_flags(p: argparse.ArgumentParser) -> None:
    """--wandb-project, --wandb-mode, --wandb-dir (underscore spellings accepted too)."""
    p.add_argument("--wandb-project", "--wandb_project", dest="wandb_project", default=None,
                   help="W&B project to log to (default: the config's wandb_project key, else 'mesh-transformer-jax')")
    p.add_argument("--wandb-mode", "--wandb_mode", dest="wandb_mode", choices=MODES, default="disabled",
                   help="W&B logging: disabled (default: wandb is not even imported), offline (a run folder under "
                        "--wandb-dir, for `wandb sync` later), online (needs `wandb login` or WANDB_API_KEY)")
    p.add_argument("--wandb-dir", "--wandb_dir", dest="wandb_dir", default=None,
                   help="folder that gets the wandb/ run folders (default: the current folder)")


def configure(project: Optional[str], mode: str = "disabled", dir: Optional[str] = None, name: Optional[str] = None,
              config: Optional[dict] = None) -> None:
    """Sets up this process's run (started lazily at the first log call). mode 'disabled' turns logging off."""
    if mode not in MODES:
        raise ValueError(f"--wandb-mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "disabled":
        try:
            import wandb  # noqa: F401  (fail now, at start-up, not after the first training step)
        except ImportError:
            raise ValueError("--wandb-mode offline/online needs the wandb package: pip install wandb") from None
    finish()
    _S.project, _S.mode, _S.dir, _S.name = project, mode, dir, name
    _S.config, _S.global_step, _S.failed = dict(config or {}), 0, False


def enabled() -> bool:
    return _S.mode != "disabled" and not _S.failed


def _run(cfg: Any = None):
    """The process's wandb run, started on first use; None when logging is off."""
    if not enabled():
        return None
    if _S.run is None:
        import wandb

        config = dict(_S.config)
        if cfg is not None and hasattr(cfg, "to_dict"):
            config.setdefault("model_config", cfg.to_dict())
        project = _S.project or getattr(cfg, "wandb_project", None) or "mesh-transformer-jax"
        name = _S.name or getattr(cfg, "name", None)
        if _S.dir:
            os.makedirs(_S.dir, exist_ok=True)
        try:
            _S.run = wandb.init(project=project, name=name, mode=_S.mode, dir=_S.dir, config=config,
                                settings=wandb.Settings(console="off", x_disable_stats=True))
        except Exception as e:  # e.g. online without credentials: training goes on, unlogged
            log.warning("W&B logging off: wandb.init failed (%s: %s)", type(e).__name__, e)
            _S.failed = True
            return None
        _S.run.define_metric("train/global_step")
        for prefix in ("train/*", "val/*"):
            _S.run.define_metric(prefix, step_metric="train/global_step")
        _S.run.define_metric("star/iteration")
        _S.run.define_metric("star/*", step_metric="star/iteration")
    return _S.run


def log_train(record: Dict[str, Any], cfg: Any = None) -> None:
    """One training step's metrics record (finetune's metrics.jsonl line)."""
    run = _run(cfg)
    if run is None:
        return
    _S.global_step += 1
    row = {f"train/{k}": record[k] for k in _TRAIN_KEYS if k in record}
    row["train/step"] = record.get("step")
    row["train/global_step"] = _S.global_step
    for k, v in record.items():  # validation losses: "val/{set}/loss"
        if k.startswith("val/") and isinstance(v, (int, float)):
            row[k] = v
    run.log(row)


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, bool):
        out[prefix] = int(value)
    elif isinstance(value, (int, float)):
        out[prefix] = value


def log_iteration(row: Dict[str, Any]) -> None:
    """One STaR iteration's results row (results.json / results.md): its numbers, under star/."""
    run = _run()
    if run is None:
        return
    out: dict = {}
    _flatten("star", {k: v for k, v in row.items() if k != "iteration"}, out)
    out["star/iteration"] = row.get("iteration", 0)
    run.log(out)


def log_files(paths: List[str], name: str = "results", type: str = "results") -> None:
    """The existing files of `paths` as one artifact (e.g. results.md, accuracy.png)."""
    run = _run()
    present = [p for p in paths if p and os.path.exists(p)]
    if run is None or not present:
        return
    import wandb

    art = wandb.Artifact(name, type=type)
    for p in present:
        art.add_file(p)
    run.log_artifact(art)


def finish() -> None:
    """Ends the run (writes the summary; an offline run folder is then complete)."""
    if _S.run is not None:
        folder = os.path.dirname(_S.run.dir)
        try:
            _S.run.finish()
        finally:
            _S.run = None
        if _S.mode == "offline":  # wandb's service may still be writing the run file: wait for its last record
            import time
            end = time.monotonic() + 30
            while time.monotonic() < end:
                try:
                    if any(r.WhichOneof("record_type") == "exit" for r in read_records(folder)):
                        break
                except Exception:  # not yet complete: a record cut short
                    pass
                time.sleep(0.1)


def run_dir() -> Optional[str]:
    """The folder of the current run (None when none is running)."""
    return None if _S.run is None else os.path.dirname(_S.run.dir)


# ---------------------------------------------------------------------------------------------------------------
# Reading an offline run back (its .wandb file: W&B's LevelDB-style log of protobuf records)
# ---------------------------------------------------------------------------------------------------------------
_BLOCK, _HEADER = 32768, 7
_FULL, _LAST = 1, 4


def read_records(run_folder: str) -> List[Any]:
    """The protobuf Records of the run folder's run-*.wandb file (wandb.proto.wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(os.path.join(run_folder, "run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_folder} holds no run-*.wandb file; pass a wandb/offline-run-* folder")
    data = open(files[0], "rb").read()
    ident = struct.unpack("<4sHB", data[:_HEADER])[0]
    if ident != b":W&B":
        raise ValueError(f"{files[0]} is not a .wandb run file")
    pos, buf, records = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        if kind == 0 and n == 0:
            pos += left - _HEADER
            continue
        buf += data[pos:pos + n]
        pos += n
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def read_history(run_folder: str) -> List[Dict[str, Any]]:
    """The rows logged with run.log, in order, as dicts."""
    rows = []
    for rec in read_records(run_folder):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


def read_artifact_files(run_folder: str) -> List[str]:
    """Names of the files in the artifacts the run logged."""
    names = []
    for rec in read_records(run_folder):
        if rec.WhichOneof("record_type") == "artifact":
            names.extend(entry.path for entry in rec.artifact.manifest.contents)
    return names
