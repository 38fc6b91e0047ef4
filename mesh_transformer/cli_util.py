"""Small helpers shared by the command-line tools: logging set-up and quiet library imports."""
import logging
import os


def setup_logging(level: int = logging.INFO) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "urllib3", "google", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
