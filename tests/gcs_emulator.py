"""A local Google Cloud Storage for tests: `gcp-storage-emulator` on 127.0.0.1 and a free port.

Use it from a test module with `from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401` (tests/ is on
sys.path; import both, as pytest looks fixtures up by name in the module). A test that takes `gcs_bucket` gets a fresh,
empty bucket name, and `gs://{gcs_bucket}/...` paths go to the emulator through google-cloud-storage and smart_open
(both honour STORAGE_EMULATOR_HOST). One emulator, in memory, serves the session and is stopped at its end. Tests
skip, saying why, when the emulator is not installed.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from cli_helpers import free_port

START_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def gcs_emulator():
    """Starts the emulator; yields its URL with STORAGE_EMULATOR_HOST and a dummy project set in os.environ."""
    try:
        import gcp_storage_emulator  # noqa: F401
        from google.cloud import storage  # noqa: F401
    except ImportError as e:
        pytest.skip(f"gcp-storage-emulator / google-cloud-storage not installed ({e})")
    port = free_port()
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
           "--in-memory", "--quiet", "--default-bucket", "default-bucket"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"gcp-storage-emulator exited with {proc.returncode} at start-up:\n{out[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                pytest.fail(f"gcp-storage-emulator did not listen on port {port} within {START_TIMEOUT_S:.0f}s")
            time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["GOOGLE_CLOUD_PROJECT"] = "test-project"
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """The name of a new, empty bucket in the session's emulator."""
    from google.cloud import storage
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.Client(project="test-project").create_bucket(name)
    return name
