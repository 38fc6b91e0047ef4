"""Train on a Ray cluster with one node per host: mesh-transformer-jax's pod driver (`train.py`), for jax.distributed.

    # on every host (the head first; same repository path and Python environment on each):
    ray start --head --resources='{"jax_host": 1}'                       # host 0
    ray start --address=HEAD_IP:6379 --resources='{"jax_host": 1}'      # every other host
    # anywhere that reaches the cluster:
    python train.py --config configs/example_config.json --num-hosts 4 --ray-address auto

The original drove a TPU pod from a VM beside it: one Ray actor per TPU host, each running its shard of the model.
Here each of the --num-hosts Ray actors (one per node that offers the `jax_host` resource) starts one JAX process,
`device_train.py` with --coordinator-address (process 0's node, a free port), --num-processes and --process-id
filled in, so the hosts run the very training loop of device_train.py on one global mesh, with the same config,
checkpoints and metrics. Process 0's metrics lines are streamed back and printed here as they are written (`metrics
{...}` on stdout; each host's own log is a temp file on its node, named in the `host_started` line). When a host's process dies or its node is lost (the original's "deal with preemptible TPUs"
TODO), every process is stopped and all are started again; device_train.py resumes from the last committed
checkpoint (meta.json names a step only once every host wrote its shards), up to --max-restarts times.

Why a subprocess per actor instead of training inside the actor: JAX must see its devices (XLA_FLAGS, e.g.
--xla_force_host_platform_device_count for CPU hosts) before it is first imported, jax.distributed starts once per
process, and a restart needs fresh processes; an actor's own process is Ray's and may already hold JAX. A
subprocess in its own process group is also stopped whole, children included.

Every flag not listed below is passed to device_train.py on every host (see `python device_train.py --help`);
--force-new only on the first start, never on a restart. The checkpoint folder must be one all hosts reach
(gs://, or a shared file system), as in a multi-host device_train.py run.

Test hook: STAR_TEST_TRAIN_PY_CRASH=H:N in the driver's environment gives host H's process, on the first start only,
STAR_TEST_CRASH_AT_STEP=N (checkpoint.py: it SIGKILLs itself in the middle of writing step N). Never set it outside
tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

from mesh_transformer.cli_util import ERRORS_EPILOG, run_main, setup_logging

REPO = os.path.dirname(os.path.abspath(__file__))
CRASH_ENV = "STAR_TEST_TRAIN_PY_CRASH"
log = logging.getLogger("train")
_OURS = ("--coordinator-address", "--num-processes", "--process-id", "--distributed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other flag goes to device_train.py on every host. " + ERRORS_EPILOG)
    p.add_argument("--config", required=True, help="the training config (as device_train.py's --config)")
    p.add_argument("--num-hosts", type=int, required=True,
                   help="JAX processes to start, one per Ray node offering the --host-resource")
    p.add_argument("--ray-address", default="auto",
                   help="Ray cluster to use: auto (the one this machine belongs to; default) or HEAD_IP:PORT")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="how many times all hosts are restarted after one fails (default 3); 0: fail at once")
    p.add_argument("--host-resource", default="jax_host",
                   help="the Ray custom resource that marks a host; each node offers 1 (ray start "
                        "--resources='{\"jax_host\": 1}'), each JAX process takes 1 (default jax_host)")
    p.add_argument("--devices-per-host", type=int, default=None,
                   help="CPU hosts only: simulated CPU devices per process (XLA's "
                        "--xla_force_host_platform_device_count); accelerators need nothing")
    p.add_argument("--ray-timeout", type=float, default=120.0,
                   help="seconds any call to a host actor may take before the host counts as lost (default 120)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.split("=")[0] in _OURS]
    if bad:
        p.error(f"{', '.join(bad)}: train.py fills in the jax.distributed flags itself; remove them")
    if args.num_hosts < 1:
        p.error("--num-hosts must be at least 1")
    if args.max_restarts < 0:
        p.error("--max-restarts must be at least 0")
    import device_train
    device_train.parse_args(["--config", args.config] + rest)  # a flag device_train.py refuses fails here, at once
    args.device_train_args = rest
    return args


class HostProcess:
    """A Ray actor on one host: starts that host's JAX process (device_train.py) and answers for it."""

    def __init__(self):
        self.proc = None
        self.log_path = None

    def coordinator_address(self) -> str:
        """This node's IP and a port free on it, for process 0's coordinator."""
        import socket
        import ray
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def start(self, argv: List[str], env_extra: dict, cwd: str, devices: Optional[int]) -> dict:
        import subprocess
        import tempfile
        env = dict(os.environ)
        env.update(env_extra)
        if devices:
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
        env["PYTHONPATH"] = os.pathsep.join([REPO] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
        fd, self.log_path = tempfile.mkstemp(prefix="train_py_host_", suffix=".log")
        with os.fdopen(fd, "w") as f:
            self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "device_train.py"), *argv], cwd=cwd,
                                         env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        import socket
        return {"pid": self.proc.pid, "host": socket.gethostname(), "log": self.log_path}

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def read_from(self, path: str, where: tuple) -> tuple:
        """(complete new lines of a local file since `where` = (inode, byte offset), the next `where`). A file
        replaced since (device_train.py rewrites metrics.jsonl without the lines past the step it resumes) is read
        from its start."""
        try:
            with open(path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                offset = where[1] if where[0] == inode else 0
                f.seek(offset)
                data = f.read()
        except OSError:
            return [], where
        end = data.rfind(b"\n") + 1
        return data[:end].decode().splitlines(), (inode, offset + end)

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except (OSError, TypeError):
            return ""

    def stop(self, grace: float = 5.0) -> Optional[int]:
        """SIGINT to the process group (the process releases its lock and exits), SIGKILL after `grace` seconds."""
        import signal
        import subprocess
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                return self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll()


def _metrics_path(config: str) -> str:
    """Where process 0's device_train.py writes metrics (finetune's rule), as an absolute path."""
    from mesh_transformer import checkpoint as ckpt
    from mesh_transformer.config import load_config
    from mesh_transformer.finetune import _metrics_path as rule
    cfg = load_config(config)
    return os.path.abspath(rule(cfg, ckpt.checkpoint_dir(cfg), None))


class _Attempt:
    """One start of all hosts; `watch` returns None when all finished, else why it failed."""

    def __init__(self, ray, args, number: int, actor_cls):
        self.ray, self.args, self.number = ray, args, number
        opts = dict(resources={args.host_resource: 1}, num_cpus=0, max_restarts=0)
        self.actors = [actor_cls.options(**opts).remote() for _ in range(args.num_hosts)]

    def get(self, refs):
        return self.ray.get(refs, timeout=self.args.ray_timeout)

    def start(self) -> None:
        args = self.args
        address = self.get(self.actors[0].coordinator_address.remote())
        rest = list(args.device_train_args)
        if self.number > 0:  # a restart resumes; it never starts over
            rest = [a for a in rest if a != "--force-new"]
        crash = os.environ.get(CRASH_ENV, "")
        refs = []
        for i, actor in enumerate(self.actors):
            argv = ["--config", os.path.abspath(args.config), *rest, "--coordinator-address", address,
                    "--num-processes", str(args.num_hosts), "--process-id", str(i)]
            env = {}
            if crash and self.number == 0 and crash.split(":")[0] == str(i):
                env["STAR_TEST_CRASH_AT_STEP"] = crash.split(":")[1]
            refs.append(actor.start.remote(argv, env, os.getcwd(), args.devices_per_host))
        for i, info in enumerate(self.get(refs)):
            log.info("start %d: host %d is pid %d on %s (log %s); coordinator %s", self.number, i, info["pid"],
                     info["host"], info["log"], address)
            print(json.dumps({"event": "host_started", "attempt": self.number, "process_id": i, **info}), flush=True)

    def watch(self, stream) -> Optional[str]:
        while True:
            try:
                codes = self.get([a.poll.remote() for a in self.actors])
            except Exception as e:  # RayActorError (node lost), GetTimeoutError (hung): the host is gone
                stream()
                return f"a host stopped answering ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
            stream()
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                try:
                    tail = self.get(self.actors[i].tail.remote())
                except Exception:
                    tail = ""
                return f"host {i}'s process exited with {code}; its log ends:\n{tail[-1500:]}"
            if all(c == 0 for c in codes):
                return None
            time.sleep(0.5)

    def stop(self) -> None:
        refs = [a.stop.remote() for a in self.actors]
        for ref in refs:
            try:
                self.get(ref)
            except Exception:  # a lost host's process is gone with its node
                pass
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    ray.init(address=args.ray_address, log_to_driver=False)
    try:
        have = ray.cluster_resources().get(args.host_resource, 0)
        if have < args.num_hosts:
            raise ValueError(f"the Ray cluster at {args.ray_address} offers {have:g} of the resource "
                             f"'{args.host_resource}', --num-hosts is {args.num_hosts}: start each host's node with "
                             f"ray start --resources='{{\"{args.host_resource}\": 1}}' (or pass --host-resource)")
        actor_cls = ray.remote(HostProcess)
        metrics_path = _metrics_path(args.config)
        streamed = {"step": -1}

        for number in range(args.max_restarts + 1):
            attempt = _Attempt(ray, args, number, actor_cls)
            offset = {"at": (None, 0)}

            def stream():
                """Prints process 0's new metrics lines (steps redone after a restart are not printed again)."""
                try:
                    lines, offset["at"] = attempt.get(attempt.actors[0].read_from.remote(metrics_path, offset["at"]))
                except Exception:
                    return
                for line in lines:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if record.get("step", 0) > streamed["step"]:
                        streamed["step"] = record.get("step", 0)
                        print("metrics " + json.dumps(record), flush=True)

            try:
                attempt.start()
                why = attempt.watch(stream)
            finally:
                attempt.stop()
            if why is None:
                log.info("all %d hosts finished (start %d)", args.num_hosts, number)
                return 0
            log.warning("start %d failed: %s", number, why)
            print(json.dumps({"event": "host_failed", "attempt": number, "why": why.splitlines()[0]}), flush=True)
            if number < args.max_restarts:
                log.warning("restarting all %d hosts from the last committed checkpoint (restart %d of %d)",
                            args.num_hosts, number + 1, args.max_restarts)
        raise ValueError(f"training failed {args.max_restarts + 1} times (--max-restarts {args.max_restarts}); "
                           f"the last failure: {why}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(run_main(main))
