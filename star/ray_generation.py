"""STaR generation on Ray actors (--ray-address / --ray-workers): the question list fanned out over N workers.

Each worker (`GenerationWorker`, a Ray actor) holds one JaxBackend on its own devices: the model and the
shared-prefix Sampler, compiled once for the worker's life. It loads params itself from the checkpoint folder the
driver wrote (or the base model's folder), once per checkpoint, never per batch: at GPT-J-6B that is 24 GB each
worker reads from disk or GCS, not 24 GB through Ray's object store.

`RayBackend` is a JaxBackend whose `generate_fn` sends batches to the workers: run_pass (star/rationales.py) hands
it `ray_workers` batches at a time (`generation_batches`), it splits them on the same batch boundaries as one process
would (so every batch, and so every greedy answer, is the same), and returns the answers in question order;
run_pass then writes them to the same resumable JSONL, so a killed driver resumes as before. A worker that dies
(RayActorError) or takes longer than --ray-timeout for one batch is killed and replaced, and its batch re-run; a
batch's answers are taken once, so no question is lost or written twice. Fine-tuning stays in the driver.

Ray is imported only here, and this module only when --ray-workers is given.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, List, Optional, Sequence, Tuple

from .backend import GenerationSettings, JaxBackend
from .flags import RayOptions

log = logging.getLogger("star")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The driver's JAX set-up, given to every worker (Ray workers otherwise inherit whatever the raylet was started
# with, e.g. a test's 8 simulated devices)
FORWARDED_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "STAR_NO_COMPILE_CACHE", "TF_CPP_MIN_LOG_LEVEL",
                 "TOKENIZERS_PARALLELISM")
# Test hook (tests/test_ray_generation.py): "K:PATH" makes the first worker to start its K-th batch while PATH does
# not exist create PATH and exit at once (a worker killed mid-generation, exactly once per run); "K:PATH:hang" makes
# it hang instead (a worker that never answers)
TEST_EXIT_ENV = "STAR_TEST_RAY_WORKER_EXIT"

Source = Tuple  # ("random",) | ("base", location) | ("ckpt", folder, step): where a worker reads params from


class RemoteParams:
    """Params that only the workers load (device_inference.py): the driver never holds them."""

    def __init__(self, source: Source):
        self.source = source


class GenerationWorker:
    """The actor: one model replica and its sampler. Plain class; `ray.remote` is applied in `_actor_class`."""

    def __init__(self, cfg, gen: GenerationSettings, compile_cache: Optional[str]):
        from mesh_transformer.cli_util import setup_compile_cache, setup_logging
        setup_logging()
        if compile_cache:
            setup_compile_cache(compile_cache)
        self.backend = JaxBackend(cfg, None, gen, progress=False)
        self.source: Optional[Source] = None
        self.generate = None
        self.batches = 0

    def load(self, source: Source) -> int:
        """Loads the params of `source` unless they are already loaded; returns the checkpoint step (-1: none)."""
        if source != self.source:
            self.generate = None  # free the old params before the new ones arrive
            if source[0] == "ckpt":
                from mesh_transformer import checkpoint as ckpt
                params, _, step, _ = ckpt.load_checkpoint(source[1], self.backend.cfg, step=source[2], with_opt=False)
                params = self.backend.trainer.put_params(params)
                self.step = step
            else:
                self.backend.base_location = source[1] if source[0] == "base" else None
                self.backend._base = None
                params, self.step = self.backend.base_params(), -1
            self.generate = self.backend.generate_fn(params)
            self.source = source
        return self.step

    def run(self, source: Source, prompts: Sequence[str], shared_prefix: str, max_new_tokens: int,
            stop: Sequence[str]) -> List[str]:
        """One batch with the params of `source` (loaded first when they are not the current ones)."""
        self.batches += 1
        _test_exit(self.batches)
        self.load(source)
        return self.generate(prompts, shared_prefix, max_new_tokens, stop)

    def where(self) -> str:
        import socket

        import jax
        return f"{socket.gethostname()} pid {os.getpid()} devices {jax.devices()}"


def _test_exit(batch: int) -> None:
    spec = os.environ.get(TEST_EXIT_ENV)
    if not spec:
        return
    k, path, *mode = spec.split(":")
    if batch == int(k):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        if mode == ["hang"]:
            time.sleep(3600)
        os._exit(1)


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        import ray
        _ACTOR = ray.remote(max_restarts=0, max_task_retries=0)(GenerationWorker)
    return _ACTOR


class WorkerPool:
    """N GenerationWorkers; `map` runs batches on them, replacing dead or hung ones, and returns results in order."""

    def __init__(self, opts: RayOptions, cfg, gen: GenerationSettings, compile_cache: Optional[str]):
        import ray
        self.ray, self.opts = ray, opts
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address=opts.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True)
        env = {k: os.environ[k] for k in FORWARDED_ENV + (TEST_EXIT_ENV,) if k in os.environ}
        env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                      if p])
        self._args = (cfg, gen, compile_cache)
        self._options = dict(num_cpus=opts.ray_worker_cpus, num_gpus=opts.ray_worker_gpus,
                             runtime_env={"env_vars": env})
        self.workers = [self._start() for _ in range(opts.ray_workers)]
        log.info("started %d Ray generation workers (%s)", len(self.workers),
                 opts.ray_address or "a private Ray instance on this machine")

    def _start(self):
        return _actor_class().options(**self._options).remote(*self._args)

    def _replace(self, worker, why: str):
        try:
            self.ray.kill(worker, no_restart=True)
        except Exception:  # already gone
            pass
        new = self._start()
        self.workers[self.workers.index(worker)] = new
        log.warning("Ray generation worker replaced (%s)", why)
        return new

    def load(self, source: Source) -> int:
        """Every worker loads `source` now (in parallel); returns its checkpoint step."""
        steps = self.map("load", [(source,)] * len(self.workers), spread=True)
        return steps[0]

    def map(self, method: str, jobs: Sequence[tuple], spread: bool = False) -> List[Any]:
        """worker.method(*job) for every job, each on whichever worker is free; results in job order. spread: one
        job per worker (each worker must run one). A worker that dies or passes --ray-timeout on a job is replaced
        and the job re-run (at most --ray-retries times per job); an exception raised by the job itself stops the
        run (it would fail again)."""
        ray, timeout = self.ray, self.opts.ray_timeout
        results: List[Any] = [None] * len(jobs)
        tries = [0] * len(jobs)
        todo = collections.deque(range(len(jobs)))
        idle = list(self.workers)
        running = {}  # ref -> (worker, job index, deadline)
        while todo or running:
            while todo and idle:
                worker, j = idle.pop(0), todo.popleft()
                running[getattr(worker, method).remote(*jobs[j])] = (worker, j, time.monotonic() + timeout)
            wait_s = max(0.0, min(d for _, _, d in running.values()) - time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            failed = []
            for ref in ready:
                worker, j, _ = running.pop(ref)
                try:
                    results[j] = ray.get(ref, timeout=timeout)
                    idle.append(worker)
                except ray.exceptions.RayTaskError as e:  # the job raised: a real error, not a lost worker
                    cause = e.as_instanceof_cause()
                    raise cause if isinstance(cause, (ValueError, OSError)) else RuntimeError(str(e)) from None
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
                    failed.append((worker, j, f"it died during batch {j + 1} of {len(jobs)}: {type(e).__name__}"))
            now = time.monotonic()
            for ref, (worker, j, deadline) in list(running.items()):
                if now >= deadline:
                    running.pop(ref)
                    failed.append((worker, j, f"batch {j + 1} of {len(jobs)} took over --ray-timeout {timeout:g} s"))
            for worker, j, why in failed:
                tries[j] += 1
                if tries[j] > self.opts.ray_retries:
                    raise RuntimeError(f"Ray generation: batch {j + 1} failed {tries[j]} times (last: {why}); see the "
                                       f"workers' logs above, or raise --ray-retries / --ray-timeout")
                new = self._replace(worker, why + "; re-running it on a new worker")
                if spread:  # the job must run on this worker slot: the new worker takes it
                    running[getattr(new, method).remote(*jobs[j])] = (new, j, time.monotonic() + timeout)
                else:
                    idle.append(new)
                    todo.appendleft(j)
        return results

    def close(self) -> None:
        for worker in self.workers:
            try:
                self.ray.kill(worker, no_restart=True)
            except Exception:
                pass
        self.workers = []


class RayBackend(JaxBackend):
    """JaxBackend whose generation runs on Ray workers; training, packing and the driver's params are unchanged.
    The workers load params from files, so the backend remembers where each params object it handed out came from
    (the base location, or the checkpoint folder and step fine-tuning or load_params used)."""

    def __init__(self, cfg, base_location: Optional[str], gen: GenerationSettings, ray_opts: RayOptions,
                 compile_cache: Optional[str] = None, **kwargs):
        super().__init__(cfg, base_location, gen, **kwargs)
        self.generation_batches = ray_opts.ray_workers  # run_pass hands over this many batches per call
        self.ray_opts, self._compile_cache = ray_opts, compile_cache
        self._pool: Optional[WorkerPool] = None
        self._sources: list = []  # (params, source), the latest few

    def pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(self.ray_opts, self.cfg, self.gen, self._compile_cache)
        return self._pool

    def _remember(self, params, source: Source):
        self._sources = [(p, s) for p, s in self._sources[-3:] if p is not params] + [(params, source)]
        return params

    def base_params(self):
        loc = self.base_location
        source = ("random",) if not loc or loc == "random" else ("base", loc if "://" in loc else os.path.abspath(loc))
        if source == ("random",) and self._base is None:
            log.warning("random base with Ray workers: each worker makes the same seeded init on its own devices, "
                        "equal to this process's only with the same device layout")
        return self._remember(super().base_params(), source)

    def load_params(self, ckpt_dir: str, step: Optional[int] = None):
        from mesh_transformer import checkpoint as ckpt
        step = step if step is not None else ckpt.latest_step(ckpt_dir)
        return self._remember(super().load_params(ckpt_dir, step), ("ckpt", _abs(ckpt_dir), step))

    def finetune(self, base_params, index_path: str, steps: int, ckpt_dir: str, **kwargs):
        from mesh_transformer import checkpoint as ckpt
        params = super().finetune(base_params, index_path, steps, ckpt_dir, **kwargs)
        return self._remember(params, ("ckpt", _abs(ckpt_dir), ckpt.latest_step(ckpt_dir)))

    def remote_checkpoint(self, ckpt_dir: str, step: Optional[int]) -> Tuple[RemoteParams, int]:
        """A checkpoint only the workers load (each reads it now); returns (params handle, the step loaded)."""
        step = self.pool().load(("ckpt", _abs(ckpt_dir), step))
        return RemoteParams(("ckpt", _abs(ckpt_dir), step)), step

    def remote_base(self, location: str) -> Tuple[RemoteParams, int]:
        """A base model folder (an HF folder, or a v1 checkpoint) only the workers load; returns (handle, -1)."""
        source = ("base", _abs(location))
        self.pool().load(source)
        return RemoteParams(source), -1

    def generate_fn(self, params):
        if isinstance(params, RemoteParams):
            source = params.source
        else:
            source = next((s for p, s in self._sources if p is params), None)
            if source is None:
                raise ValueError("Ray generation workers load params from a checkpoint folder; these params have "
                                 "none (generate without --ray-workers)")
        batch = self.gen.batch_size

        def generate(prompts: Sequence[str], shared_prefix: str, max_new_tokens: int, stop: Sequence[str]):
            # the batches one process would make: run_pass's chunks are generation_batches x batch_size long
            jobs = [(source, list(prompts[i:i + batch]), shared_prefix, max_new_tokens, tuple(stop))
                    for i in range(0, len(prompts), batch)]
            return [c for part in self.pool().map("run", jobs) for c in part]
        return generate

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def make_backend(ray_opts: RayOptions, cfg, base_location, gen: GenerationSettings, compile_cache=None, **kwargs):
    """JaxBackend without --ray-workers (nothing changes), RayBackend with."""
    if not ray_opts.ray_workers:
        return JaxBackend(cfg, base_location, gen, **kwargs)
    return RayBackend(cfg, base_location, gen, ray_opts, compile_cache=compile_cache, **kwargs)


def shutdown(backend) -> None:
    """Stops the workers (and the private Ray instance this process started)."""
    if isinstance(backend, RayBackend):
        backend.close()
        import ray
        if ray.is_initialized():
            ray.shutdown()
