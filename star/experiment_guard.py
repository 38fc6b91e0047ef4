"""One owner and one history for a STaR experiment folder (iteration_train.py --out-dir).

`open_experiment(args, cfg)` is called before anything is written to the folder. It
  1. takes the folder's lock (mesh_transformer.run_lock): a second iteration_train.py on the same --out-dir stops
     at once, naming the holder;
  2. checks --start_iter: the iterations before it must be complete in the folder (else the run would train on
     nothing and report rows that do not exist);
  3. records or checks the run identity (mesh_transformer.run_identity): the task, every flag that changes what an
     iteration makes, the model config and the base model. A rerun with other flags used to reuse the old
     iterations, run new ones with the new flags and overwrite run_config.json; now it refuses with the differences
     listed, unless --force-new (the folder's contents are deleted first) or --resume-anyway;
It returns the held lock (a context manager); iteration_train.py then writes run_config.json as before. `check_flags(args)` checks the numeric flags' ranges.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from mesh_transformer import flag_checks as fc
from mesh_transformer import run_identity, run_lock

log = logging.getLogger("star")

TOOL = "iteration_train.py"
FLAG_RANGES = {
    "--p_rationalization": fc.share(), "--p_show_hint_save": fc.share(), "--n_iters": fc.at_least(0),
    "--start_iter": fc.at_least(1), "--n_train_samples": fc.at_least(1), "--n_dev_samples": fc.at_least(1),
    "--gen_length": fc.at_least(1), "--gradient_accumulation_steps": fc.at_least(1),
    "--start_steps": fc.at_least(0), "--add_steps": fc.at_least(0), "--grow_steps": fc.positive(),
    "--base_epochs": fc.at_least(0), "--add_epochs": fc.at_least(0), "--sequence_count": fc.at_least(1),
    "--replay_n": fc.at_least(0), "--copy_n": fc.at_least(0), "--max-steps": fc.at_least(1),
    "--eval_batch_size": fc.at_least(1), "--temperature": fc.at_least(0), "--n_samples": fc.at_least(1),
    "--min_digits": fc.at_least(1), "--max_digits": fc.at_least(1), "--n_exemplars": fc.at_least(0),
    "--n_dev_per_digit": fc.at_least(1),
}
# flags that do not change what the iterations make: where and how long, how it is shown
NOT_IN_IDENTITY = {"out_dir", "n_iters", "start_iter", "dry_run", "progress", "skip_eval", "eval_batch_size",
                   "force_new", "resume_anyway", "options", "compile_cache", "chunk_size", "desc"}


def check_flags(args: Any) -> None:
    fc.check(args, FLAG_RANGES, TOOL)
    if getattr(args, "task", None) == "arithmetic" and args.max_digits < args.min_digits:
        raise fc.FlagError(f"--max_digits {args.max_digits} is smaller than --min_digits {args.min_digits} ({TOOL}); "
                           f"give --max_digits >= --min_digits")


def _base_fields(location: Any) -> dict:
    from mesh_transformer import checkpoint as ckpt
    if not location or location == "random":
        return {"location": "random"}
    path = str(location)
    path = path if "://" in path else os.path.abspath(path)
    try:
        step = ckpt.latest_step(path)
    except ckpt.CheckpointError:
        step = None
    return {"location": path.rstrip("/"), "step": step}


def experiment_fields(args: Any, cfg: Any) -> dict:
    options = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IN_IDENTITY and k != "config"}
    options["base_model_location"] = _base_fields(args.base_model_location)
    model = run_identity.config_fields(cfg)
    return {"task": args.task, "options": options, "config_hash": run_identity.config_hash(model), "config": model}


def _has_outputs(out_dir: str) -> bool:
    if not os.path.isdir(out_dir):
        return False
    return any(n == "results.json" or n.startswith("iter_") for n in os.listdir(out_dir))


def _clear(out_dir: str) -> None:
    for name in os.listdir(out_dir):
        if name == run_lock.LOCK_NAME:
            continue
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _check_start_iter(args: Any) -> None:
    if args.start_iter <= 1:
        return
    from . import report
    done = {r["iteration"] for r in report.load_results(os.path.join(args.out_dir, "results.json"))
            if r.get("complete")}
    missing = [n for n in range(1, args.start_iter) if n not in done]
    if missing:
        raise fc.FlagError(f"--start_iter {args.start_iter}: iteration(s) {', '.join(map(str, missing[:10]))} are not "
                           f"complete in {args.out_dir} (results.json), so iteration {args.start_iter} has no model "
                           f"to start from; start at --start_iter 1, or point --out-dir at the folder of that run")


def open_experiment(args: Any, cfg: Any) -> run_lock.RunLock:
    out_dir = args.out_dir
    lock = run_lock.acquire(out_dir, owner=TOOL, what=f"experiment folder (--out-dir) {out_dir}")
    try:
        if getattr(args, "force_new", False) and args.start_iter > 1:
            raise fc.FlagError(f"--force-new starts {out_dir} over, so --start_iter must be 1 (got {args.start_iter})")
        _check_start_iter(args)
        run_identity.check_identity(out_dir, "star", experiment_fields(args, cfg), what="experiment folder",
                                    force_new=getattr(args, "force_new", False),
                                    resume_anyway=getattr(args, "resume_anyway", False),
                                    has_outputs=lambda: _has_outputs(out_dir), clear=lambda: _clear(out_dir))
    except BaseException:
        lock.release()
        raise
    return lock
