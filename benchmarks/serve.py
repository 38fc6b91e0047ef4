"""Requests/s of device_serve.py under load: 1, 8 and 64 concurrent HTTP clients on 127.0.0.1.

    python benchmarks/serve.py                     # tiny GPT-J (random weights, fp32, byte tokenizer), CPU
    python benchmarks/serve.py --clients 1,8,64 --max-tokens 32 --requests-per-level 256

The server is the real CLI (`device_serve.py`, a subprocess with a random-init config written to a temp dir); the
clients are httpx.AsyncClient coroutines in this process, each sending its requests one after another (a client
waits for its answer before the next request). Every request: a 24-byte prompt of its own, `--max-tokens` greedy new
tokens, /v1/completions. Before timing, every batch size the levels can produce is compiled by warm-up rounds.
Reported per level: requests/s, new tokens/s, median and p95 latency, mean rows per sampler batch (from /health).
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,64", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests-per-level", type=int, default=512, help="requests sent at each level (split "
                                                                       "evenly over its clients; at least 1 each)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (greedy)")
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's --batch-wait-ms")
    p.add_argument("--layers", type=int, default=4, help="model layers")
    p.add_argument("--d-model", type=int, default=128, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq", type=int, default=256, help="model context")
    p.add_argument("--server-args", default="", help="extra flags for device_serve.py (e.g. '--hf ./gpt-j-6b')")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _level(url: str, clients: int, total: int, max_tokens: int, tag: str) -> dict:
    import aiohttp

    per = max(1, total // clients)
    latencies, new_tokens = [], []

    async def client(c: int, http):
        for k in range(per):
            prompt = f"{tag} client {c:03d} req {k:03d}."[:24].ljust(24)
            t0 = time.perf_counter()
            async with http.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                               "temperature": 0}) as r:
                r.raise_for_status()
                body = await r.json()
            latencies.append(time.perf_counter() - t0)
            new_tokens.append(body["usage"]["completion_tokens"])

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return dict(clients=clients, requests=len(lat), wall=wall, rps=len(lat) / wall, tps=sum(new_tokens) / wall,
                p50=statistics.median(lat), p95=lat[min(len(lat) - 1, int(0.95 * len(lat)))])


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx  # health checks; the load comes from aiohttp

    levels = [int(x) for x in args.clients.split(",")]
    tmp = tempfile.mkdtemp(prefix="serve_bench_")
    cfg = dict(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=264, seq=args.seq,
               pe_rotary_dims=args.d_model // args.heads // 2, tokenizer="byte", compute_dtype="float32",
               cores_per_replica=1, per_replica_batch=1, model_dir="")
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    port = _free_port()
    server_flags = args.server_args.split() or ["--config", cfg_path]
    cmd = [sys.executable, os.path.join(ROOT, "device_serve.py"), *server_flags, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "1024", "--batch-wait-ms", str(args.batch_wait_ms)]
    log = open(os.path.join(tmp, "server.log"), "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise SystemExit("server did not come up in 300 s")
            time.sleep(0.5)
        # warm-up: every power-of-two batch size up to the largest level, twice
        print("warming up (compiles)...", file=sys.stderr)
        size = 1
        while size <= min(max(levels), args.max_batch):
            for _ in range(2):
                asyncio.run(_level(url, size, size, args.max_tokens, "warm"))
            size *= 2
        rows = []
        for clients in levels:
            before = httpx.get(f"{url}/health").json()["stats"]
            res = asyncio.run(_level(url, clients, max(args.requests_per_level, clients), args.max_tokens,
                                     "bench"))
            after = httpx.get(f"{url}/health").json()["stats"]
            batches = after.get("batches", 0) - before.get("batches", 0)
            res["rows_per_batch"] = (after.get("rows", 0) - before.get("rows", 0)) / max(batches, 1)
            rows.append(res)
            print(f"{clients} clients: {res['rps']:.1f} req/s", file=sys.stderr)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    base = rows[0]["rps"]
    print(f"load average: {os.getloadavg()[0]:.1f}; model {args.layers} layers, d_model {args.d_model}, seq "
          f"{args.seq}; {args.max_tokens} new tokens per request")
    print("| clients | requests | req/s | vs 1 client | new tokens/s | p50 latency s | p95 latency s | rows/batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['rps'] / base:.1f}x | {r['tps']:.0f} | "
              f"{r['p50']:.2f} | {r['p95']:.2f} | {r['rows_per_batch']:.1f} |")
    return 0


if __name__ == "__main__":
    from mesh_transformer.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # before jax: malloc tunables for XLA:CPU (host_malloc.py)
    sys.exit(main())
