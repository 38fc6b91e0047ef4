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
ERRORS_EPILOG = (f"On an error the tool prints one line `error: ...` and exits with 1; set {DEBUG_ENV}=1 for a "
                 f"traceback.")


def setup_logging(level: int = logging.INFO) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "urllib3", "google", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
