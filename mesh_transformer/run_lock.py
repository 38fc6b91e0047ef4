"""One owner per run folder: an exclusive lock file that every writer of a folder takes before it writes.

A second `device_train.py` on the same model_dir, a second `iteration_train.py` on the same --out-dir (and so on)
used to run side by side and interleave their append-only files. Now each writer calls

    lock = run_lock.acquire(folder, owner="device_train.py")   # raises LockError naming the holder
    ...
    lock.release()                                             # also on exit (atexit), and via `with`

Local folders: `{folder}/run.lock` is created with O_CREAT | O_EXCL (atomic: of two processes racing, exactly one
creates it) and holds JSON {"pid", "host", "started", "owner", "argv", "proc_start"}. A lock whose host is this
host and whose process is gone (or whose pid now belongs to a newer process: `proc_start` differs, read from
/proc) is stale: it is broken and taken, with a warning. Breaking is itself serialised by a second O_EXCL file
(`run.lock.break`), so two processes that both find the same stale lock cannot both take it. A lock held on
another host cannot be checked from here: the error says which host and pid hold it, and to delete the file if
that process is gone.

gs:// folders: the lock is the object `{folder}/run.lock`, created with the precondition
`if_generation_match=0` (GCS creates it only if no live object of that name exists: atomic across machines), and
deleted on release with `if_generation_match=<our generation>` (never someone else's lock). Stale detection is the
same as for local locks (same host, process gone).

Test hook: none; tests race real processes and threads on the lock (tests/test_run_folder_safety.py).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_BREAK_STALE_AFTER_S = 60.0
_EMPTY_STALE_AFTER_S = 10.0  # an empty lock file older than this: its creator died between creating and writing it  # a `.break` file older than this was left by a process killed while breaking a lock


class LockError(ValueError):
    """The folder is held by another writer; the message names the holder and what to do."""


def _proc_start(pid: int) -> Optional[str]:
    """The start time of process pid in clock ticks since boot (/proc/pid/stat field 22); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _holder_info(owner: str) -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "owner": owner, "argv": sys.argv[:8], "proc_start": _proc_start(pid), "thread": threading.get_ident()}


def describe(holder: dict) -> str:
    if not holder:
        return "a writer that is just starting (the lock file is still empty)"
    return (f"{holder.get('owner') or 'a writer'} (pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')})")


def is_stale(holder: dict) -> bool:
    """True when the holder ran on this host and its process is gone (or the pid was reused)."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    try:
        pid = int(holder.get("pid"))
    except (TypeError, ValueError):
        return False
    if not _alive(pid):
        return True
    recorded, now = holder.get("proc_start"), _proc_start(pid)
    return bool(recorded and now and recorded != now)


def _is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


class RunLock:
    """A held lock; release() (idempotent) frees it. Usable as a context manager."""

    def __init__(self, folder: str, path: str, holder: dict, generation: Optional[int] = None):
        self.folder, self.path, self.holder, self.generation = folder, path, holder, generation
        self.released = False
        atexit.register(self.release)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            if _is_gcs(self.path):
                _gcs_release(self.path, self.generation)
            else:
                current = _read_local(self.path)
                if current.get("pid") == self.holder["pid"] and current.get("thread") == self.holder["thread"]:
                    os.remove(self.path)
        except Exception as e:  # never mask the error that ends the run
            log.warning("could not release the lock %s: %s; delete it by hand if no writer runs", self.path, e)
        try:
            atexit.unregister(self.release)
        except Exception:  # pragma: no cover
            pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({self.path!r}, released={self.released})"


# ------------------------------------------------------------------------------------------------ local files
def _read_local(path: str) -> dict:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _create_local(path: str, holder: dict) -> bool:
    """True if this call created the lock file (O_CREAT | O_EXCL), False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(holder))
        f.flush()
        os.fsync(f.fileno())
    return True


def _wait_for_holder(path: str, timeout_s: float = 1.0) -> dict:
    """The holder info of a lock file found empty: its creator writes it right after creating the file, so wait for
    that (up to timeout_s) to name the holder in the error; {} if it stays empty or goes away."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(0.01)
        if not os.path.exists(path):
            return {}
        holder = _read_local(path)
        if holder:
            return holder
    return {}


def _break_local(path: str, seen: dict) -> None:
    """Removes a stale lock, unless another process broke (and maybe re-took) it meanwhile."""
    guard = path + ".break"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - os.path.getmtime(guard) > _BREAK_STALE_AFTER_S:
                os.remove(guard)
        except OSError:
            pass
        return
    try:
        os.close(fd)
        if _read_local(path) == seen:  # still the stale one we looked at
            log.warning("breaking the stale lock %s of %s: that process is gone", path, describe(seen))
            os.remove(path)
    finally:
        os.remove(guard)


def _acquire_local(folder: str, path: str, owner: str, what: str) -> RunLock:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise LockError(f"cannot create the {what} {folder}: {e.strerror or e}; choose a folder you can write to")
    holder = _holder_info(owner)
    for _ in range(20):
        try:
            created = _create_local(path, holder)
        except OSError as e:
            raise LockError(f"cannot write the lock file {path}: {e.strerror or e}; the {what} must be writable")
        if created:
            return RunLock(folder, path, holder)
        seen = _read_local(path) or _wait_for_holder(path)
        if not seen:  # its creator is between creating and writing it, or was killed right there
            try:
                young = time.time() - os.path.getmtime(path) < _EMPTY_STALE_AFTER_S
            except FileNotFoundError:
                young = True  # released meanwhile: it was held when we looked, so this writer still lost
            if young:
                raise LockError(_held_message(path, {}, what))
            _break_local(path, seen)
            continue
        if is_stale(seen):
            _break_local(path, seen)
            continue
        raise LockError(_held_message(path, seen, what))
    raise LockError(_held_message(path, _read_local(path), what))


def _held_message(path: str, holder: dict, what: str) -> str:
    here = holder.get("host") == socket.gethostname()
    fix = ("wait for it to finish or stop it, or use another folder" if here else
           f"wait for it to finish, or use another folder; if that process is gone (it ran on another host, so this "
           f"cannot be checked from here), delete {path}")
    return f"{what} is in use: {path} is held by {describe(holder)}; {fix}"


# ------------------------------------------------------------------------------------------------ gs://
def _gcs_blob(path: str):
    from .checkpoint import _gcs_client, _split_gcs
    bucket, name = _split_gcs(path)
    return _gcs_client().bucket(bucket).blob(name)


def _acquire_gcs(folder: str, path: str, owner: str, what: str) -> RunLock:
    from google.api_core import exceptions as gexc
    holder = _holder_info(owner)
    for _ in range(10):
        blob = _gcs_blob(path)
        try:
            # exists() first only gives a clear answer on servers that ignore preconditions (the test emulator);
            # on GCS the precondition alone decides who of two racing writers wins
            if not blob.exists():
                blob.upload_from_string(json.dumps(holder), content_type="application/json", if_generation_match=0)
                return RunLock(folder, path, holder, generation=blob.generation)
        except gexc.PreconditionFailed:
            pass
        existing = _gcs_blob(path)
        try:
            seen = json.loads(existing.download_as_bytes())
            generation = existing.generation
        except gexc.NotFound:
            continue  # released meanwhile: try again
        except ValueError:
            seen, generation = {}, existing.generation
        if is_stale(seen):
            log.warning("breaking the stale lock %s of %s: that process is gone", path, describe(seen))
            try:
                existing.delete(if_generation_match=generation)
            except (gexc.PreconditionFailed, gexc.NotFound):
                pass
            continue
        raise LockError(_held_message(path, seen, what))
    raise LockError(f"{what}: could not take the lock {path} after 10 tries; another writer keeps taking it")


def _gcs_release(path: str, generation: Optional[int]) -> None:
    from google.api_core import exceptions as gexc
    try:
        _gcs_blob(path).delete(if_generation_match=generation)
    except (gexc.PreconditionFailed, gexc.NotFound):
        log.warning("the lock %s was no longer ours on release (broken as stale?)", path)


# ------------------------------------------------------------------------------------------------ entry point
def lock_path(folder: str, name: str = LOCK_NAME) -> str:
    folder = str(folder).rstrip("/") or "."
    return f"{folder}/{name}" if _is_gcs(folder) else os.path.join(folder, name)


def acquire(folder: str, owner: str = "", what: Optional[str] = None, name: str = LOCK_NAME) -> RunLock:
    """Takes the exclusive lock of `folder` (created if missing; local or gs://) or raises LockError naming the
    holder. `owner` (e.g. the CLI's name) and `what` ("model_dir", "experiment folder") go into messages."""
    folder = str(folder).rstrip("/") or "."
    what = what or f"folder {folder}"
    owner = owner or os.path.basename(sys.argv[0] or "python")
    path = lock_path(folder, name)
    if _is_gcs(folder):
        return _acquire_gcs(folder, path, owner, what)
    return _acquire_local(folder, path, owner, what)


def holder_of(folder: str, name: str = LOCK_NAME) -> Optional[dict]:
    """The holder recorded in a local folder's lock file, None when unlocked."""
    path = lock_path(folder, name)
    if _is_gcs(path) or not os.path.exists(path):
        return None
    return _read_local(path)


def owns_model_dir(train_fn):
    """Decorator of finetune.train(cfg, options, ...): holds the lock of the run's checkpoint folder
    (options.ckpt_path, else the config's bucket/model_dir) while it runs."""
    import functools

    @functools.wraps(train_fn)
    def wrapper(cfg, options=None, *args, **kwargs):
        from .checkpoint import checkpoint_dir
        path = (getattr(options, "ckpt_path", None) or checkpoint_dir(cfg)).rstrip("/")
        with acquire(path, what=f"model_dir {path}"):
            return train_fn(cfg, options, *args, **kwargs)
    return wrapper
