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
    CheckpointError, RecordFormatError, InputError, TokenizerError) are all ValueErrors."""
    return (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)


def error_message(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Calls main(argv); returns its exit code, or 1 after printing `error: <message>` for a user error."""
    try:
        return int(main(argv) or 0)
    except user_error_types() as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
