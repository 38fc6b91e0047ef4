"""Small helpers shared by the command-line tools: logging set-up, quiet library imports, and one-line errors.

`run_main(main)` runs a CLI's main function and turns the errors a user can fix (a bad config, a missing or
malformed file, a checkpoint that does not fit) into one line `error: <message>` on stderr and exit code 1, instead of
a traceback. Set STAR_DEBUG=1 to get the full traceback instead.
"""
import logging
import os
import sys
from typing import Callable, Optional, Sequence

DEBUG_ENV = "STAR_DEBUG"
NO_COMPILE_CACHE_ENV = "STAR_NO_COMPILE_CACHE"
DEFAULT_COMPILE_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "star_jax")
ERRORS_EPILOG = (f"On an error the tool prints one line `error: ...` and exits with 1; set {DEBUG_ENV}=1 for a "
                 f"traceback.")


def setup_logging(level: int = logging.INFO) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "urllib3", "google", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_compile_cache_flag(parser) -> None:
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help=f"JAX's persistent compilation cache folder, so a rerun (e.g. after a crash) does not "
                             f"compile again (default {DEFAULT_COMPILE_CACHE}, or $JAX_COMPILATION_CACHE_DIR; "
                             f"{NO_COMPILE_CACHE_ENV}=1 turns it off)")


def setup_compile_cache(folder: Optional[str] = None) -> Optional[str]:
    """Turns on JAX's persistent compilation cache (programs that took over a second to compile), unless
    STAR_NO_COMPILE_CACHE is set; JAX_COMPILATION_CACHE_DIR, when set, wins over the default folder."""
    if os.environ.get(NO_COMPILE_CACHE_ENV, "") not in ("", "0"):
        return None
    import jax
    folder = folder or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILE_CACHE
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        logging.getLogger(__name__).warning("compilation cache %s not used: %s", folder, e)
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def user_error_types() -> tuple:
    """Exceptions whose message tells the user what to fix. The project's own error classes (ConfigError,
    CheckpointError, RecordFormatError, InputError, TokenizerError, LockError, IdentityError, TrainingDiverged) are
    all ValueErrors; OSError covers I/O faults (disk full, permissions, missing files)."""
    return (ValueError, OSError, EOFError)


# Exceptions of optional libraries, by class name (so that this module imports none of them): expected faults with
# a known fix.
_CREDENTIALS = ("DefaultCredentialsError", "RefreshError", "TransportError")
_FOREIGN = _CREDENTIALS + ("SafetensorError", "UnpicklingError", "BadZipFile", "GoogleAPICallError",
                           "ClientError", "ServerError", "RetryError")
_ERRNO_FIX = {"ENOSPC": "free space on that disk or write the outputs elsewhere",
              "EDQUOT": "free space (disk quota exceeded) or write the outputs elsewhere",
              "EACCES": "check the permissions or choose a path you can write to",
              "EPERM": "check the permissions or choose a path you can write to",
              "EROFS": "the file system is read-only: choose another path",
              "EISDIR": "a folder is in the way: pass a file path",
              "ENOTDIR": "a file is in the way: pass a folder path",
              "ENOENT": "check the path"}


def _is_foreign_user_error(e: BaseException) -> bool:
    return any(c.__name__ in _FOREIGN for c in type(e).__mro__)


def error_message(e: BaseException) -> str:
    import errno as errno_mod
    names = {c.__name__ for c in type(e).__mro__}
    if names & set(_CREDENTIALS):
        msg = (f"no usable Google Cloud credentials for gs:// ({type(e).__name__}: {_first_line(e)[:160]}); run "
               f"`gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account "
               f"key file")
    elif "UnpicklingError" in names:
        msg = (f"refused to unpickle a file: it holds Python objects other than tensors, which could run code "
               f"({_first_line(e)}); do not load it. Get the weights as model.safetensors from a source you trust")
    elif "SafetensorError" in names:
        msg = f"a safetensors file is damaged or truncated ({_first_line(e)}); download or export it again"
    elif "GoogleAPICallError" in names or "ClientError" in names or "ServerError" in names:
        msg = f"Google Cloud Storage refused the request ({_first_line(e)}); check the bucket name and your access"
    elif isinstance(e, OSError) and e.errno and e.strerror:
        code = errno_mod.errorcode.get(e.errno, str(e.errno))
        where = f": {e.filename}" if e.filename else ""
        msg = f"{e.strerror}{where} ({code}); {_ERRNO_FIX.get(code, 'check the path and the disk')}"
    else:
        msg = str(e)
    msg = " ".join(msg.split()) or type(e).__name__
    if "weights_only" in msg:  # never pass on torch's advice to load a refused pickle unsafely
        msg = ("refused to load a pickle file: it holds objects other than tensors, which could run code; do not "
               "load it. Get the weights as model.safetensors from a source you trust")
    return msg


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _close_progress_bars() -> None:
    """Ends open tqdm bars, so that the error line starts on a line of its own."""
    tqdm_mod = sys.modules.get("tqdm.std") or sys.modules.get("tqdm")
    cls = getattr(tqdm_mod, "tqdm", None)
    bars = list(getattr(cls, "_instances", []) or [])
    for bar in bars:
        try:
            bar.close()
        except Exception:  # pragma: no cover - a bar in a bad state must not hide the error
            pass
    if bars:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Calls main(argv); returns its exit code, or 1 after printing `error: <message>` for a user error.

    Run as a script (`run_main(main)` from its `__main__` block, argv None), the process first re-executes itself
    with glibc malloc tunables that keep XLA:CPU's per-run buffers mapped (host_malloc.py: ~1.3x faster CPU steps);
    called with an argv (tests, other code) it never does."""
    if argv is None and getattr(main, "__module__", None) == "__main__":
        from .host_malloc import reexec_with_malloc_tunables

        reexec_with_malloc_tunables()
    try:
        return int(main(argv) or 0)
    except Exception as e:
        if not isinstance(e, user_error_types()) and not _is_foreign_user_error(e):
            raise
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        _close_progress_bars()
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1


def check_output_dir(folder: str, what: str) -> bool:
    """Checks, before any work, that `folder` (local or gs://) can take the outputs, without creating it: an
    existing folder gets a probe file written and removed; a missing one needs a writable nearest existing parent.
    Returns whether the folder exists. Raises ValueError naming the folder and `what` (e.g. "--output-dir")."""
    folder = str(folder) or "."
    if folder.startswith("gs://"):
        from mesh_transformer import checkpoint as ckpt
        bucket, name = ckpt._split_gcs(folder)
        blob = ckpt._gcs_client().bucket(bucket).blob(f"{name.rstrip('/')}/.write-probe-{os.getpid()}".lstrip("/"))
        blob.upload_from_string(b"")
        blob.delete()
        return True
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{what} {folder} is a file, not a folder; pass a folder (it is created if missing)")
    if os.path.isdir(folder):
        try:
            probe = os.path.join(folder, f".write-probe-{os.getpid()}")
            with open(probe, "w") as f:
                f.write("probe")
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"{what} {folder} cannot be written to ({e.strerror or e}); choose a folder you can "
                             f"write to") from None
        return True
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {folder} cannot be created: {parent} is a file; pass another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder} cannot be created: {parent} is not writable; choose a folder you can "
                         f"write to")
    return False


def remove_if_empty(folder: str) -> None:
    """Removes a local folder this run created, when a failure left it empty."""
    try:
        if not str(folder).startswith("gs://") and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    except OSError:
        pass


def add_distributed_flags(parser) -> None:
    """The multi-process flags of every training CLI (mesh_transformer/distributed.py reads them). Without any of
    them a CLI runs in one process, exactly as before."""
    g = parser.add_argument_group("multi-process training (jax.distributed; docs/SCALING.md)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator (any free port on process 0's host); with "
                        "--num-processes and --process-id this starts jax.distributed, one process per host, all "
                        "hosts' devices in one ('dp','mp') mesh")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes (hosts)")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's id, 0 .. N-1")
    g.add_argument("--distributed", choices=("off", "auto"), default="off",
                   help="auto: start jax.distributed with what JAX detects itself (Cloud TPU pod slices, SLURM, "
                        "Open MPI, Kubernetes jobs; JAX_COORDINATOR_ADDRESS); the flags above, when given, win. "
                        "off (default): one process unless the flags above are given")
