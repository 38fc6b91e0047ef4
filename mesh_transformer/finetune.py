"""The training loop behind `device_train.py` and STaR's per-iteration fine-tuning.

Follows mtj's `device_train.py`: start from a tuned checkpoint (`--tune-model-path`, schedule restarted), or resume
from the config's own checkpoint folder (`meta.json`, loader state included), or start fresh; checkpoint every
`ckpt_every` steps and at the end; validate every `val_every` steps over `val_batches` batches per val set. Resumed
runs reproduce the uninterrupted run: the loader state and the full optimizer state are part of every checkpoint, and
metrics lines past the resumed step are dropped before new ones are appended, so nothing is written twice.

Multi-process (jax.distributed started, mesh_transformer/distributed.py): every process runs this same loop on the
global mesh. Each decodes only its rows of every batch (the loader still steps over the others' records, so its
state, saved in checkpoints, is the global stream's); process 0 alone holds the run lock, checks and records the run
identity, writes metrics.jsonl, logs and shows the bar (and calls `on_step`); checkpoints are written by all
(checkpoint.save_checkpoint: each process its shard folders, process 0 commits meta.json after a barrier); a resume
reads into the global shardings, each process only its devices' parts of the files (load_checkpoint(shardings=)).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed, finite_guard, run_identity, run_lock
from .config import Config
from .train import Trainer, TrainState, device_peak_flops, mfu

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunOptions:
    tune_model_path: Optional[str] = None  # fine-tune from this v1 checkpoint folder (schedule restarts at 0)
    fresh_opt: bool = False  # with tune_model_path: ignore its Adam state
    init_params: Any = None  # start from these params (host or device arrays; copied) instead of a checkpoint or init
    anneal_steps: Optional[int] = None  # the schedule's horizon (default cfg.anneal_steps); data, not a recompile
    ckpt_path: Optional[str] = None  # default: checkpoint.checkpoint_dir(cfg)
    metrics_path: Optional[str] = None  # default: {ckpt_path}/metrics.jsonl when local, else ./logs/{name}.metrics.jsonl
    total_steps: Optional[int] = None  # default: cfg.total_steps
    seed: int = 0
    slim_final: bool = False  # write the last checkpoint without optimizer state (bf16 params)
    progress: bool = True
    desc: str = "train"
    memory_check: bool = False  # before anything is loaded: compile the step on abstract shapes, stop if it won't fit
    force_new: bool = False  # start over in ckpt_path (its steps, meta.json and metrics are deleted)
    resume_anyway: bool = False  # resume although the run identity differs (recorded in run_identity.json)
    recover_meta: bool = False  # rebuild a missing / damaged meta.json from the complete step folders


def _metrics_path(cfg: Config, ckpt_path: str, explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    if "://" not in ckpt_path:
        return os.path.join(ckpt_path, "metrics.jsonl")
    return os.path.join("logs", f"{cfg.name}.metrics.jsonl")


def _truncate_metrics(path: str, after_step: int) -> None:
    """Drops lines of steps > after_step (written by a run that crashed before its next checkpoint), and a last line
    cut short by a crash in the middle of writing it."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= after_step
        except json.JSONDecodeError:
            return False

    kept = [line if line.endswith("\n") else line + "\n" for line in lines if keep(line)]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON object per line; also logs each record to W&B when a CLI turned that on
    (mesh_transformer/wandb_log.py: --wandb-mode offline|online; nothing imports wandb otherwise)."""

    def __init__(self, path: str, cfg: Config):
        self.path = path
        self.cfg = cfg
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_guard.strict_json(record)) + "\n")
        from . import wandb_log  # imports no wandb unless it is turned on
        wandb_log.log_train(record, self.cfg)


def _to_host(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x), tree)


def restart_schedule(opt_state: Any) -> Any:
    """Zeroes the LR schedule's step and keeps Adam's moments and count, as mtj's device_train.py does when
    fine-tuning (`network.state["opt_state"][-1] = init_sched_state`)."""
    import optax

    def reset(x):
        if isinstance(x, optax.ScaleByScheduleState):
            return x._replace(count=np.zeros_like(np.asarray(x.count)))
        return x

    return jax.tree.map(reset, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def _make_loader(cfg: Config, index: str, train: bool, batch: int, ga: int, state: Optional[dict] = None,
                 rows: Optional[tuple] = None):
    from tfrecord_utils.loader import TFRecordLoader
    loader = TFRecordLoader(index, batch_shape=(ga, batch), seq=cfg.seq, train=train, n_vocab=cfg.n_vocab, rows=rows)
    if state:
        loader.set_state(state)
    return loader


def _tuning_start(cfg: Config, options: RunOptions):
    """(params, opt_state or None) of --tune-model-path: a checkpoint folder or step (v1 for GPT-J, HF steps for the
    Llama family, whose plain HF folders read the same way), or an HF GPT-J folder (params only)."""
    from .hf_checkpoint import is_hf_step
    path = options.tune_model_path
    if not cfg.is_llama and is_hf_step(path):
        from .hf import load_hf_gptj
        return load_hf_gptj(path)[1], None
    params, opt_state, _, _ = ckpt.load_checkpoint(path, cfg, with_opt=not options.fresh_opt)
    return params, opt_state


def _global_batch(cfg: Config, trainer: Trainer) -> int:
    return cfg.per_replica_batch * trainer.mesh.shape["dp"]


class _BatchFeed:
    """Global batches [GA, B, T+1] (or [B, T+1]) on the trainer's mesh: in one process the loader's whole batch is
    transferred; in several, each process's loader decodes only the rows its devices hold and the global array is
    assembled from the processes' parts (distributed.global_batch)."""

    def __init__(self, trainer: Trainer, shape: tuple):
        self.shape = shape
        self.sharding = trainer.batch_sharding(len(shape))
        self.multi = distributed.process_count() > 1
        self.rows = distributed.batch_rows(self.sharding, shape, len(shape) - 2) if self.multi else None

    def put(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        if len(self.shape) == 2:
            batch = {k: v[0] for k, v in batch.items()}  # the loader's [1, B, T+1]
        if self.multi:
            return distributed.global_batch(batch, self.sharding, self.shape)
        return batch if len(self.shape) == 2 else jax.device_put(batch, self.sharding)


def evaluate(trainer: Trainer, params: Any, cfg: Config, batch: int) -> Dict[str, float]:
    """Mean loss over `val_batches` batches of each val set (one pass at most)."""
    results = {}
    feed = _BatchFeed(trainer, (batch, cfg.seq + 1))
    for name, index in (cfg.val_set or {}).items():
        loader = _make_loader(cfg, index, train=False, batch=batch, ga=1, rows=feed.rows)
        losses = []
        for i, b in enumerate(loader):
            if cfg.val_batches and i >= cfg.val_batches:
                break
            out = trainer.eval_step(params, feed.put(b))
            losses.append(float(out["loss"]))
        if losses:
            results[f"val/{name}/loss"] = float(np.mean(losses))
    return results


class _NoMetrics:
    """The metrics writer of processes other than 0."""

    def write(self, record: Dict[str, Any]) -> None:
        pass


def _owns_model_dir(train_fn):
    """run_lock.owns_model_dir on process 0 (the one writer of the folder's own files); the other processes of a
    multi-process run write only their checkpoint shards, inside the commit protocol process 0 drives."""
    locked = run_lock.owns_model_dir(train_fn)

    @functools.wraps(train_fn)
    def wrapper(cfg, options=None, *args, **kwargs):
        return (locked if distributed.is_main() else train_fn)(cfg, options, *args, **kwargs)
    return wrapper


@_owns_model_dir
def train(cfg: Config, options: Optional[RunOptions] = None, trainer: Optional[Trainer] = None,
          on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainState:
    """Runs training to `total_steps` and returns the final state (checkpoints written on the way)."""
    options = options or RunOptions()
    # cheap checks first: a wrong path should fail before the model is built
    ckpt_path = options.ckpt_path or ckpt.checkpoint_dir(cfg)
    if not cfg.train_set:
        raise ValueError("config has no 'train_set': set it to a TFRecord index file (see create_finetune_tfrecords.py)")
    trainer = trainer or Trainer(cfg)
    if options.memory_check:
        from .memory import check_before_run
        check_before_run(trainer=trainer, log=log)
    total_steps = options.total_steps if options.total_steps is not None else cfg.total_steps
    batch = _global_batch(cfg, trainer)
    ga = cfg.gradient_accumulation_steps
    feed = _BatchFeed(trainer, (ga, batch, cfg.seq + 1))
    main, multi = distributed.is_main(), feed.multi
    loader = _make_loader(cfg, cfg.train_set, train=True, batch=batch, ga=ga, rows=feed.rows)  # checks the index

    if main:
        run_identity.check_training_folder(cfg, options, ckpt_path,
                                           _metrics_path(cfg, ckpt_path, options.metrics_path),
                                           loader_factory=lambda: _make_loader(cfg, cfg.train_set, True, batch, ga))
    distributed.barrier("finetune: folder checked")  # the others read meta.json only once process 0 is done with it
    loader_state = None
    resumed = ckpt.latest_step(ckpt_path)  # an interrupted run of this config resumes first
    if resumed is not None:
        # several processes: each reads only the parts of the files its devices hold, into the global shardings
        params, opt_state, step, aux = ckpt.load_checkpoint(
            ckpt_path, cfg, with_opt=True, forget_bad=main, shardings=trainer.shardings if multi else None,
            param_dtype=trainer.param_dtype)
        state = trainer.state_from_params(params, opt_state, step)
        loader_state = (aux or {}).get("train_loader")
        log.info("resuming %s from step %d", ckpt_path, step)
    elif options.tune_model_path:
        params, opt_state = _tuning_start(cfg, options)
        if opt_state is not None and not options.fresh_opt:
            opt_state = restart_schedule(opt_state)
        state = trainer.state_from_params(params, None if options.fresh_opt else opt_state, 0)
        log.info("fine-tuning from %s (optimizer state %s)", options.tune_model_path,
                 "fresh" if options.fresh_opt or opt_state is None else "loaded")
    elif options.init_params is not None:
        state = trainer.state_from_params(options.init_params)
    else:
        state = trainer.init_state(jax.random.PRNGKey(options.seed))
    start = int(state.step)
    if multi:  # every process must have resumed the same step (a damaged step is skipped by process 0 first)
        from jax.experimental import multihost_utils
        multihost_utils.assert_equal(np.int32(start), "the processes resumed different steps")

    metrics_path = _metrics_path(cfg, ckpt_path, options.metrics_path)
    if main:
        _truncate_metrics(metrics_path, start)
    writer = MetricsWriter(metrics_path, cfg) if main else _NoMetrics()
    if loader_state:
        loader.set_state(loader_state)
    peak = device_peak_flops()  # this host's devices; the hosts of a multi-process run are alike
    peak = peak * jax.process_count() if peak else peak
    guard = finite_guard.FiniteGuard(cfg, ckpt_path, start, latest=lambda: ckpt.latest_step(ckpt_path))
    tokens = ga * batch * cfg.seq

    def save(step: int, loader_state: dict, final: bool = False) -> None:
        ckpt.save_checkpoint(ckpt_path, state if not (final and options.slim_final) else state.params, step, cfg,
                             slim=final and options.slim_final, aux={"train_loader": loader_state},
                             keep_n=cfg.keep_n, keep_every=cfg.keep_every or None)

    def next_batch():  # read, decode and start its transfer to the devices while the current step runs
        return feed.put(next(loader))

    def needs_state(step: int) -> bool:  # validation and checkpoints read the state after `step`
        return (step == total_steps or bool(cfg.val_every and cfg.val_set and step % cfg.val_every == 0)
                or bool(cfg.ckpt_every and step % cfg.ckpt_every == 0))

    bar = tqdm(total=total_steps, initial=start, desc=options.desc, disable=not (options.progress and main),
               dynamic_ncols=True)
    t_last = time.time()

    def log_step(step: int, out: dict) -> None:
        """Reads a step's metrics (the only wait for the device) and writes its line."""
        nonlocal t_last
        out = {k: float(v) for k, v in out.items()}
        now = time.time()
        dt = now - t_last  # the step alone: validation and checkpoint time are excluded below
        record = {"step": step, "loss": out["loss"], "ce": out["ce"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                  "tokens_per_s": tokens / dt, "mfu": mfu(cfg, tokens / dt, peak), "time": now}
        if cfg.val_every and step % cfg.val_every == 0 and cfg.val_set:
            record.update(evaluate(trainer, state.params, cfg, batch))
        writer.write(record)
        guard.check(step, record)  # a non-finite loss / grad norm stops here, before the next checkpoint
        bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}", tok_s=f"{tokens / dt:,.0f}")
        bar.update(1)
        if on_step and main:
            on_step(step, record)
        t_last = time.time()

    # The host never waits for a step before it has queued the next one: step s+1 is dispatched before step s's
    # metrics are read, and its batch was read while step s ran. Only a step whose state is needed (validation,
    # checkpoint, the end) is waited for before the next is dispatched (the train step donates its state).
    step = start
    unread = None  # (step, metrics) dispatched but not yet logged
    batch_dev = next_batch() if step < total_steps else None
    while step < total_steps:
        state, out = trainer.train_step(state, batch_dev, options.anneal_steps)
        step += 1
        loader_state = loader.get_state()  # where step+1's batch starts: what a checkpoint of this step records
        batch_dev = next_batch() if step < total_steps else None
        if unread is not None:
            log_step(*unread)
        unread = (step, out)
        if needs_state(step):
            log_step(*unread)
            unread = None
            if step < total_steps and cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save(step, loader_state)
                t_last = time.time()
    bar.close()
    if step > start or ckpt.latest_step(ckpt_path) is None:
        save(step, loader.get_state(), final=True)  # nothing was read past the last step
    return state
