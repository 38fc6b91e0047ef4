"""device_serve's HTTP server (mesh_transformer/serving.py) on 127.0.0.1, started and stopped by the tests: a real
uvicorn server in a thread, real HTTP clients (httpx; raw sockets for broken clients).

  * 64 concurrent clients x 4 requests: all answered, greedy completions identical to offline Sampler.generate, and
    the worker did gather them into batches;
  * 20+ kinds of bad request each get a clear 4xx naming the field (or are dropped cleanly), and after each one the
    server answers a good request;
  * a full queue gets 503 with Retry-After; the CLI's --help and flag errors.
"""
import asyncio
import json
import socket
import time

import jax
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mesh_transformer.model import CausalTransformer  # noqa: E402
from mesh_transformer.sampling import Sampler  # noqa: E402
from mesh_transformer.serving import BatchEngine, ServerThread, make_app  # noqa: E402
from mesh_transformer.sharding import make_mesh  # noqa: E402
from mesh_transformer.tokenizer import get_tokenizer  # noqa: E402

from helpers import random_params  # noqa: E402

TINY = dict(layers=2, d_model=64, n_heads=4, n_vocab=260, seq=128, pe_rotary_dims=8, compute_dtype="float32",
            tokenizer="byte")
NEW = 8
# 9-16 bytes each: one prompt bucket (16), so the test compiles few shapes
PROMPTS = [f"prompt {i:02d} {'xyzw'[i % 4] * (i % 5)}" for i in range(32)]


@pytest.fixture(scope="module")
def server():
    model = CausalTransformer(TINY)
    params = random_params(model, seed=5)
    params["projection/lm_head"]["w"] *= 0.5
    sampler = Sampler(model, params, mesh=make_mesh(1, jax.devices()[:1]))
    tok = get_tokenizer("byte")
    engine = BatchEngine(sampler, tok, max_batch=16, max_queue=256, wait_ms=5)
    srv = ServerThread(make_app(engine, model_name="tiny")).start()
    try:
        yield dict(url=srv.url, port=srv.port, engine=engine, sampler=sampler, tok=tok)
    finally:
        srv.stop()
        engine.shutdown()


def _good(url):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 4, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_64_clients_x_4_requests_greedy_equals_offline_generate(server):
    want = dict(zip(PROMPTS, server["sampler"].generate(PROMPTS, server["tok"], NEW, temperature=0.0, stop=(),
                                                        batch_size=16)))
    batches_before = server["engine"].stats["batches"]

    async def client(c, http):
        out = []
        for k in range(4):
            prompt = PROMPTS[(c * 4 + k) % len(PROMPTS)]
            r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": NEW, "temperature": 0})
            assert r.status_code == 200, r.text
            out.append((prompt, r.json()["choices"][0]["text"]))
        return out

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server["url"], timeout=120, limits=limits) as http:
            return await asyncio.gather(*(client(c, http) for c in range(64)))

    t0 = time.perf_counter()
    results = [pair for per_client in asyncio.run(asyncio.wait_for(main(), 240)) for pair in per_client]
    elapsed = time.perf_counter() - t0
    batches = server["engine"].stats["batches"] - batches_before
    print(f"\n256 requests from 64 clients in {elapsed:.1f} s ({256 / elapsed:.1f} req/s), {batches} batches")
    assert len(results) == 256
    assert all(text == want[prompt] for prompt, text in results)
    assert batches < 256 / 4  # gathered: at least 4 rows per batch on average


def test_list_prompt_seed_logprobs_and_complete(server):
    url = server["url"]
    body = {"prompt": ["ab", "cd"], "max_tokens": 5, "temperature": 0.8, "top_p": 0.9, "seed": 7, "logprobs": 1}
    a = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    b = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # same seed, same samples
    lp = a["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) > 0
    assert all(x <= 0 for x in lp["token_logprobs"])
    assert "".join(lp["tokens"]) == a["choices"][0]["text"]
    stop = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0,
                                                    "stop": [server["tok"].decode([0])[:1] or "\x00"]}, timeout=60)
    assert stop.status_code == 200
    r = httpx.post(f"{url}/complete", json={"context": "eleutherai", "top_p": 0.9, "temp": 0.75}, timeout=60)
    assert r.status_code == 200 and isinstance(r.json()["completion"], str)
    h = httpx.get(f"{url}/health", timeout=10).json()
    assert h["status"] == "ok" and h["seq"] == 128


def _raw(port, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if not read:
            return b""
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


P = "/v1/completions"
BAD = [  # (name, method, path, body (json-able, or bytes sent as is), expected status, text the error must contain)
    ("not JSON", "POST", P, b"this is not json", 400, "not a valid JSON"),
    ("empty body", "POST", P, b"", 400, "JSON"),
    ("JSON array", "POST", P, [1, 2], 400, "JSON"),
    ("invalid UTF-8", "POST", P, b"{\"prompt\": \"\xff\xfe\"}", 400, "JSON"),
    ("lone surrogate in prompt", "POST", P, b'{"prompt": "a\\ud800b"}', 400, "cannot be tokenized"),
    ("prompt missing", "POST", P, {"max_tokens": 3}, 422, "prompt"),
    ("prompt a number", "POST", P, {"prompt": 123}, 422, "prompt"),
    ("prompt list of numbers", "POST", P, {"prompt": [1, 2]}, 422, "prompt"),
    ("empty prompt list", "POST", P, {"prompt": []}, 422, "prompt"),
    ("max_tokens a string", "POST", P, {"prompt": "a", "max_tokens": "8"}, 422, "max_tokens"),
    ("max_tokens negative", "POST", P, {"prompt": "a", "max_tokens": -1}, 422, "max_tokens"),
    ("max_tokens zero", "POST", P, {"prompt": "a", "max_tokens": 0}, 422, "max_tokens"),
    ("max_tokens fractional", "POST", P, {"prompt": "a", "max_tokens": 1.5}, 422, "max_tokens"),
    ("top_p 0", "POST", P, {"prompt": "a", "top_p": 0}, 422, "top_p"),
    ("top_p 2", "POST", P, {"prompt": "a", "top_p": 2}, 422, "top_p"),
    ("temperature negative", "POST", P, {"prompt": "a", "temperature": -1}, 422, "temperature"),
    ("top_k negative", "POST", P, {"prompt": "a", "top_k": -5}, 422, "top_k"),
    ("stop a number", "POST", P, {"prompt": "a", "stop": 5}, 422, "stop"),
    ("five stop strings", "POST", P, {"prompt": "a", "stop": list("abcde")}, 422, "stop"),
    ("logprobs 10", "POST", P, {"prompt": "a", "logprobs": 10}, 422, "logprobs"),
    ("seed negative", "POST", P, {"prompt": "a", "seed": -3}, 422, "seed"),
    ("unknown field", "POST", P, {"prompt": "a", "frobnicate": True}, 422, "frobnicate"),
    ("stream", "POST", P, {"prompt": "a", "stream": True}, 400, "stream"),
    ("100 kB prompt", "POST", P, {"prompt": "x" * 100_000, "max_tokens": 4}, 400, "100000 tokens"),
    ("prompt + max_tokens > seq", "POST", P, {"prompt": "x" * 100, "max_tokens": 40}, 400, "context of 128"),
    ("max_tokens >= seq", "POST", P, {"prompt": "a", "max_tokens": 500}, 400, "max_tokens"),
    ("/complete without context", "POST", "/complete", {"top_p": 0.9, "temp": 0.7}, 422, "context"),
    ("/complete temp a string", "POST", "/complete", {"context": "a", "temp": "hot"}, 422, "temp"),
    ("GET on a POST route", "GET", P, None, 405, ""),
    ("unknown route", "POST", "/v2/nothing", {"prompt": "a"}, 404, ""),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_request_gets_4xx_and_server_goes_on(server, case):
    name, method, path, body, status, needle = case
    url = server["url"] + path
    if isinstance(body, bytes):
        r = httpx.request(method, url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    elif body is None:
        r = httpx.request(method, url, timeout=30)
    else:
        r = httpx.request(method, url, json=body, timeout=30)
    assert r.status_code == status, (name, r.status_code, r.text)
    assert needle in r.text, (name, r.text)
    if r.status_code in (400, 422):
        assert "error" in r.json() and r.json()["error"]["message"]
    _good(server["url"])


def test_broken_clients_are_dropped_cleanly(server):
    port, url = server["port"], server["url"]
    head = f"POST {P} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # 1. cut off mid-body: 100 bytes announced, 12 sent, then the connection closes
    _raw(port, (head + "Content-Length: 100\r\n\r\n").encode() + b'{"prompt": "', read=False)
    _good(url)
    # 2. body larger than the limit, announced: 413 without reading it
    resp = _raw(port, (head + "Content-Length: 5000000\r\n\r\n").encode() + b"{")
    assert b" 413 " in resp.split(b"\r\n")[0], resp[:200]
    # 3. a Content-Length that is no number
    resp = _raw(port, (head + "Content-Length: lots\r\n\r\n").encode())
    assert resp.split(b"\r\n")[0].split(b" ")[1].startswith(b"4"), resp[:200]
    # 4. disconnecting mid-generation: a long request, then the socket closes at once
    before = server["engine"].stats["client_gone"] + server["engine"].stats["dropped_cancelled"]
    body = json.dumps({"prompt": "z" * 20, "max_tokens": 100, "temperature": 0}).encode()
    for _ in range(3):
        _raw(port, (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body, read=False)
    end = time.monotonic() + 30
    while (server["engine"].stats["client_gone"] + server["engine"].stats["dropped_cancelled"] <= before
           and time.monotonic() < end):
        time.sleep(0.1)
    assert server["engine"].stats["client_gone"] + server["engine"].stats["dropped_cancelled"] > before
    _good(url)
    # 5. garbage instead of HTTP
    _raw(port, b"\x00\x01\x02 not http at all\r\n\r\n")
    _good(url)


def test_full_queue_gets_503_with_retry_after(server):
    engine = BatchEngine(server["sampler"], server["tok"], max_batch=2, max_queue=2, wait_ms=1)
    srv = ServerThread(make_app(engine)).start()
    try:
        r = httpx.post(f"{srv.url}{P}", json={"prompt": ["a", "b", "c"], "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "busy" in r.json()["error"]["message"]
    finally:
        srv.stop()
        engine.shutdown()


def test_cli_help_and_errors(capsys):
    import device_serve
    from mesh_transformer.cli_util import run_main

    with pytest.raises(SystemExit):
        device_serve.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--ckpt", "--hf", "--host", "--port", "--max-batch", "--max-queue"):
        assert flag in text
    assert device_serve.parse_args([]).host == "127.0.0.1" and device_serve.parse_args([]).port == 5000
    assert run_main(device_serve.main, ["--config", "tiny", "--max-batch", "0"]) == 1
    assert "error: --max-batch" in capsys.readouterr().err


def test_device_serve_cli_serves_and_stops(tmp_path):
    """The real CLI in a subprocess: up, one completion, /health, then terminated (killed if it hangs)."""
    import subprocess
    import sys

    from cli_helpers import REPO, cli_env

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY, "seq": 64}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO / "device_serve.py"), "--config", str(config), "--port",
                             str(port), "--max-batch", "4"], cwd=str(REPO), env=cli_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "device_serve.py did not come up"
            time.sleep(0.3)
        r = httpx.post(f"{url}/complete", json={"context": "hi", "top_p": 0.9, "temp": 0.0}, timeout=60)
        assert r.status_code == 200 and isinstance(r.json()["completion"], str)
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "RANDOMLY INITIALISED" in out and "serving" in out
