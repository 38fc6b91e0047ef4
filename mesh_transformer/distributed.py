"""Multi-process (multi-host) training on `jax.distributed`: one JAX process per host, one global ('dp','mp') mesh.

mtj trained GPT-J on TPU pods with one Ray worker per host running the same SPMD program; today JAX's own
multi-controller runtime does that job. `initialize` starts it from the CLI flags of `cli_util.add_distributed_flags`
(`--coordinator-address HOST:PORT --num-processes N --process-id I`, or `--distributed auto`: whatever
`jax.distributed.initialize()` detects itself, e.g. Cloud TPU pod slices or SLURM); without them nothing changes and
the program runs in one process as before. After it, `jax.devices()` lists every host's devices, so
`sharding.make_mesh` builds the global mesh (process p's devices are consecutive: rows of the mesh, with mp inside a
host when mp divides the local device count).

What the rest of the code does differently when `process_count() > 1` (finetune.py, checkpoint.py):
  - each process reads and decodes only its rows of every global batch (`batch_rows`) and the global batch array is
    assembled from the processes' parts (`global_batch`, `jax.make_array_from_process_local_data`);
  - each process writes the checkpoint shard folders whose data its devices hold, and process 0 commits meta.json
    after a barrier (`barrier`), so a crash of any process never leaves a committed step with missing shards;
  - logs below WARNING, metrics files, the run lock and the tqdm bar come from process 0 only (`is_main`).
On CPU the cross-process collectives are gloo's (TCP), JAX's default in 0.10; `initialize` names it anyway.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

log = logging.getLogger(__name__)



def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = False) -> bool:
    """Starts jax.distributed when asked (explicit flags, or auto); returns whether it did. Call it before anything
    touches a JAX device. Raises ValueError naming the flag when the explicit flags are incomplete or inconsistent."""
    explicit = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
                "--process-id": process_id}
    given = {k: v for k, v in explicit.items() if v is not None}
    if not given and not auto:
        return False
    if given and not auto and len(given) < 3:
        missing = ", ".join(k for k in explicit if k not in given)
        raise ValueError(f"multi-process training needs --coordinator-address, --num-processes and --process-id "
                         f"together; {missing} missing (or pass --distributed auto on a cluster JAX detects)")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must lie in 0 .. {num_processes - 1} (--num-processes {num_processes}), got "
                         f"{process_id}")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(f"--coordinator-address must be HOST:PORT (e.g. 10.0.0.1:8476), got {coordinator_address!r}")
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    if jax.process_index() != 0:  # one process speaks for the run; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    log.info("jax.distributed: process %d of %d, %d local and %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def initialize_from_args(args: Any) -> bool:
    """`initialize` with the flags of cli_util.add_distributed_flags."""
    return initialize(args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed == "auto")


def process_count() -> int:
    import jax
    return jax.process_count()


def is_main() -> bool:
    """Whether this process speaks for the run (logs, metrics, locks, meta.json): process 0, or the only one."""
    import jax
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op in one process). `name` must be the same string in
    every process and unique along the program's path (it names the rendezvous)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def batch_rows(sharding: Any, global_shape: Tuple[int, ...], axis: int) -> Tuple[int, int]:
    """[lo, hi): the rows along `axis` of a global array of `global_shape` that this process's devices hold. A
    process of a ('dp','mp') mesh holds whole dp rows, consecutive ones (the mesh puts each process's devices
    together): checked."""
    n = global_shape[axis]
    covered = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        lo, hi, _ = index[axis].indices(n)
        covered.update(range(lo, hi))
    lo, hi = min(covered), max(covered) + 1
    if len(covered) != hi - lo:
        raise ValueError(f"this process's devices hold rows {sorted(covered)} of the batch axis: not one block; "
                         f"build the mesh from jax.devices() in order (sharding.make_mesh)")
    return lo, hi


def global_batch(local: Dict[str, Any], sharding: Any, global_shape: Tuple[int, ...]) -> Dict[str, Any]:
    """The global batch arrays from this process's rows (`batch_rows`) of each, without any host holding all."""
    import jax
    return {k: jax.make_array_from_process_local_data(sharding, v, global_shape) for k, v in local.items()}
