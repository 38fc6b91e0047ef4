"""HTTP serving of a GPT-J, the successor of mesh-transformer-jax's `device_serve.py` (a Flask `/complete` route and a
request queue drained onto the TPU in fixed batches).

Two parts:
  * `BatchEngine`: ONE worker thread owns the `Sampler` (so JAX is only ever called from one thread). Requests are
    split into rows (one per prompt) in a bounded queue; the worker takes the first waiting row, gathers more for at
    most `wait_ms` milliseconds or until `max_batch` rows, and runs them as one sampler batch (rows with the same stop
    strings share a call; each row keeps its own temperature, top-k, top-p, seed and max_tokens). Each arrival
    restarts the wait, up to 4 x `wait_ms` in all; while the clients of the last batch are expected back, up to
    10 x `wait_ms`. Under load the
    batches fill up, so throughput grows with the number of clients; alone, a request waits only `wait_ms`.
  * `make_app`: a FastAPI app with the original's `POST /complete` ({context, top_p, temp} -> {completion}), an
    OpenAI-style `POST /v1/completions` and `GET /health`. Bad requests get 400/422 with the field named; a full
    queue gets 503 with Retry-After; a prompt too long for the model gets 400 with both lengths; a client that goes
    away has its waiting rows dropped. No input stops the server: every error is answered, never raised.

Compiled shapes stay few: rows round up to a power of two (Sampler), prompts to a bucket length (Sampler), and the
new-token count of a batch to a power of two >= 16 (each row is cut back to its own max_tokens, which gives exactly
the tokens a run with that max_tokens would: decoding is causal and each row samples with its own key).
"""

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from typing import Any, List, NamedTuple, Optional, Sequence, Union

import numpy as np

from .sampling import Sampler, truncate_at_stop

log = logging.getLogger("device_serve")


class QueueFull(Exception):
    """The engine's queue has no room for the request's rows."""


class RowRequest(NamedTuple):
    ids: List[int]  # prompt token ids (non-empty)
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: tuple  # stop strings


class RowResult(NamedTuple):
    text: str
    tokens: List[int]  # the completion's token ids (EOS / text past a stop string excluded)
    logprobs: List[float]  # log p of each of `tokens` under the raw model
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def new_tokens_bucket(n: int) -> int:
    """Power of two >= max(n, 16): the few decode lengths compiled for a batch."""
    return max(16, 1 << max(n - 1, 0).bit_length())


class BatchEngine:
    """Gathers rows from concurrent requests into sampler batches on one worker thread."""

    def __init__(self, sampler: Sampler, tokenizer: Any, max_batch: int = 16, max_queue: int = 100,
                 wait_ms: float = 5.0):
        if max_batch < 1 or max_queue < 1 or wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and wait_ms >= 0")
        self.sampler, self.tokenizer = sampler, tokenizer
        self.seq = sampler.config.seq
        self.max_batch, self.max_queue, self.wait_s = max_batch, max_queue, wait_ms / 1000.0
        self._rows: collections.deque = collections.deque()  # (RowRequest, Future)
        self._cond = threading.Condition()
        self._stop = False
        self._expect = 1  # rows the next batch should wait for (see _gather)
        self.stats = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- producer side (any thread)
    def queued(self) -> int:
        return len(self._rows)

    def submit(self, rows: Sequence[RowRequest]) -> List[concurrent.futures.Future]:
        """Queues the rows (all or none); QueueFull when there is no room for all of them."""
        futures = [concurrent.futures.Future() for _ in rows]
        with self._cond:
            if self._stop:
                raise RuntimeError("the engine is shut down")
            if len(self._rows) + len(rows) > self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"{len(self._rows)} rows queued, room for {self.max_queue}")
            self._rows.extend(zip(rows, futures))
            self._cond.notify()
        return futures

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        for _, fut in list(self._rows):
            fut.cancel()

    # ----------------------------------------------------------------- the worker
    def _gather(self) -> list:
        with self._cond:
            while not self._rows and not self._stop:
                self._cond.wait(0.5)
            if self._stop:
                return []
            batch = [self._rows.popleft()]
            # Wait up to wait_s for the next row; each arrival restarts that wait (requests of many clients come
            # in as a stream, parsed one by one), never past 4 x wait_s from the first row. And while fewer rows
            # are here than `_expect` (the rows that waited through the last batch + that batch's own clients,
            # who are about to send their next requests), wait for those, up to 10 x wait_s: without this, clients
            # split into cohorts that alternate, each a part-full batch.
            start = time.monotonic()
            deadline = start + self.wait_s
            while len(batch) < self.max_batch:
                if self._rows:
                    batch.append(self._rows.popleft())
                    deadline = min(time.monotonic() + self.wait_s, start + 4 * self.wait_s)
                    continue
                until = start + 10 * self.wait_s if len(batch) < self._expect else deadline
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        # rows whose client has gone away were cancelled: drop them here, before any work
        live = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
        self.stats["dropped_cancelled"] += len(batch) - len(live)
        return live

    def _loop(self) -> None:
        while not self._stop:
            batch = self._gather()
            if not batch:
                continue
            groups: dict = {}
            for row, fut in batch:
                groups.setdefault(row.stop, []).append((row, fut))
            for stop, items in groups.items():
                try:
                    t0 = time.perf_counter()
                    results = self._run(stop, [r for r, _ in items])
                    log.debug("batch of %d rows in %.3f s", len(items), time.perf_counter() - t0)
                except Exception as e:  # a failed batch fails its requests, never the server
                    log.exception("batch of %d rows failed", len(items))
                    for _, fut in items:
                        fut.set_exception(e)
                    continue
                with self._cond:  # before the answers go out: who waited through this batch, + its clients
                    self._expect = min(self.max_batch, len(self._rows) + len(items))
                for (_, fut), res in zip(items, results):
                    fut.set_result(res)
                self.stats["rows"] += len(items)
                self.stats["batches"] += 1

    def _run(self, stop: tuple, rows: List[RowRequest]) -> List[RowResult]:
        longest = max(len(r.ids) for r in rows)
        want = max(r.max_tokens for r in rows)
        max_new = new_tokens_bucket(want)
        if longest + max_new > self.seq:
            max_new = want
        eos = self.tokenizer.eos_token_id
        # pad to a power of two with greedy copies of row 0: the sampler pads its batch so anyway, and the per-row
        # settings (seeds -> keys) then come in a few shapes only, instead of one compile per row count
        padded = rows + [rows[0]._replace(temperature=0.0)] * ((1 << (len(rows) - 1).bit_length()) - len(rows))
        out = self.sampler.sample([r.ids for r in padded], max_new, temperature=[r.temperature for r in padded],
                                  top_k=[r.top_k for r in padded], top_p=[r.top_p for r in padded],
                                  seed=[r.seed for r in padded], eos_id=eos,
                                  **self.sampler.stop_arguments(self.tokenizer, stop))
        results = []
        for i, r in enumerate(rows):
            n = min(int(out.lengths[i]), r.max_tokens)
            ids = [int(t) for t in out.tokens[i, :n]]
            lps = [float(x) for x in out.logprobs[i, :n]]
            finish = "length"
            if ids and ids[-1] == eos:
                ids, lps, finish = ids[:-1], lps[:-1], "stop"
            full = self.tokenizer.decode(ids)
            text = truncate_at_stop(full, stop)
            if len(text) < len(full):
                finish = "stop"
                keep = _tokens_within(self.tokenizer, ids, len(text))
                ids, lps = ids[:keep], lps[:keep]
            results.append(RowResult(text, ids, lps, finish))
        return results


def _tokens_within(tokenizer: Any, ids: List[int], n_chars: int) -> int:
    """How many leading tokens of `ids` start inside the first n_chars characters of their decoded text."""
    for k in range(len(ids)):
        if len(tokenizer.decode(ids[:k])) >= n_chars:
            return k
    return len(ids)


# ---------------------------------------------------------------------------------------------------------------
# The HTTP app
# ---------------------------------------------------------------------------------------------------------------
def make_app(engine: BatchEngine, model_name: str = "gptj", complete_max_tokens: int = 512, cors: bool = False,
             max_body_bytes: int = 1 << 20, request_timeout_s: float = 600.0):
    """The FastAPI app over `engine` (routes in the module docstring)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    tok, seq = engine.tokenizer, engine.seq
    max_prompts = 64

    class Completion(BaseModel):
        """OpenAI's legacy completions request (the fields we support; any other is an error)."""
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: Union[str, List[str]] = Field(..., description="a prompt, or a list of prompts")
        max_tokens: int = Field(16, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=100.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int = Field(0, ge=0)
        stop: Optional[Union[str, List[str]]] = None
        seed: Optional[int] = Field(None, ge=0, lt=2 ** 32)
        logprobs: Optional[int] = Field(None, ge=0, le=5)
        model: Optional[str] = None  # accepted (OpenAI clients send it), not checked
        stream: bool = False
        n: int = Field(1, ge=1, le=1)

    class Complete(BaseModel):
        """mesh-transformer-jax's /complete request."""
        model_config = ConfigDict(extra="forbid", strict=True)
        context: str
        top_p: float = Field(0.9, gt=0.0, le=1.0)
        temp: float = Field(0.75, ge=0.0, le=100.0)

    app = FastAPI(title="mesh-transformer-jax device_serve", version="2")
    if cors:  # as the original's /complete, for a browser page on another origin
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    def error(status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None):
        kind = {503: "overloaded", 413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(
            status, "invalid_request_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status,
                            headers=headers)

    app.add_middleware(_BodyLimit, limit=max_body_bytes, error=error)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):  # went away mid-body: nobody to answer
        engine.stats["client_gone"] += 1
        return error(400, "the client went away before the request body was complete")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404, 405, a body that fails to parse
        detail = str(exc.detail)
        if exc.status_code == 400 and "body" in detail:
            detail = f"the request body is not a valid JSON object ({detail})"
        return error(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid" or (not loc and first.get("type") != "missing"):
            return error(400, f"the request body is not a valid JSON object: {first.get('msg')}")
        if not loc:
            return error(400, "the request needs a JSON body")
        field = loc[0] if loc and not loc[0].isdigit() else ".".join(loc)
        where = ".".join(loc)
        msg = first.get("msg", "invalid")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field"
        return error(422, f"field '{where}': {msg}" + (f" ({len(errs) - 1} more)" if len(errs) > 1 else ""),
                     param=field)

    class Untokenizable(ValueError):
        pass

    def encode(text: str) -> List[int]:
        try:
            ids = list(tok.encode(text))
        except Exception as e:  # e.g. a lone surrogate ("\ud800") has no UTF-8 form
            raise Untokenizable(f"the prompt cannot be tokenized ({type(e).__name__}: {e})") from None
        bos = getattr(tok, "bos_token_id", None)  # Llama 2/3, Mistral: prompts start with BOS
        if bos is not None:
            return [bos] + ids
        return ids or [tok.eos_token_id]  # an empty prompt is conditioned on EOS

    @app.exception_handler(Untokenizable)
    async def untokenizable(request: Request, exc: Untokenizable):
        return error(400, str(exc), param="prompt")

    async def run(request: Request, rows: List[RowRequest]):
        try:
            futures = engine.submit(rows)
        except QueueFull as e:
            return error(503, f"server busy ({e}); retry shortly", headers={"Retry-After": "1"})
        waiting = [asyncio.wrap_future(f) for f in futures]
        deadline = time.monotonic() + request_timeout_s
        while True:
            done, pending = await asyncio.wait(waiting, timeout=0.1)
            if not pending:
                break
            if await request.is_disconnected() or time.monotonic() > deadline:
                for f in pending:
                    f.cancel()
                engine.stats["client_gone"] += 1
                return error(499, "client went away or the request timed out")
        if await request.is_disconnected():  # answered too late: nobody to send it to
            engine.stats["client_gone"] += 1
            return error(499, "client went away")
        try:
            return [f.result() for f in waiting]
        except Exception as e:
            return error(500, f"generation failed: {type(e).__name__}: {e}")

    def too_long(n_prompt: int, max_tokens: int, index: Optional[int] = None):
        which = "prompt" if index is None else f"prompt {index}"
        return error(400, f"{which} has {n_prompt} tokens and max_tokens is {max_tokens}: {n_prompt + max_tokens} "
                          f"tokens, more than the model's context of {seq}; shorten the prompt or lower max_tokens",
                     param="prompt")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "seq": seq, "queued_rows": engine.queued(),
                "max_batch": engine.max_batch, "max_queue": engine.max_queue, "stats": dict(engine.stats)}

    @app.post("/complete")
    async def complete(body: Complete, request: Request):
        ids = encode(body.context)
        room = seq - len(ids)
        if room < 1:
            return too_long(len(ids), 1)
        rows = [RowRequest(ids, min(complete_max_tokens, room), body.temp, 0, body.top_p,
                           int(np.random.randint(0, 2 ** 31)), ())]
        res = await run(request, rows)
        if not isinstance(res, list):
            return res
        return {"completion": res[0].text}

    @app.post("/v1/completions")
    async def completions(body: Completion, request: Request):
        if body.stream:
            return error(400, "streaming is not supported; send stream: false", param="stream")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            return error(422, "field 'prompt': give at least one prompt", param="prompt")
        if len(prompts) > max_prompts:
            return error(422, f"field 'prompt': {len(prompts)} prompts; at most {max_prompts} per request",
                         param="prompt")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 64 for s in stop):
            return error(422, "field 'stop': up to 4 non-empty strings of at most 64 characters", param="stop")
        if body.max_tokens >= seq:
            return error(400, f"max_tokens {body.max_tokens} leaves no room for a prompt in the model's context "
                              f"of {seq} tokens", param="max_tokens")
        seed = body.seed if body.seed is not None else int(np.random.randint(0, 2 ** 31))
        rows = []
        for i, text in enumerate(prompts):
            ids = encode(text)
            if len(ids) + body.max_tokens > seq:
                return too_long(len(ids), body.max_tokens, None if len(prompts) == 1 else i)
            rows.append(RowRequest(ids, body.max_tokens, body.temperature, body.top_k, body.top_p,
                                   (seed + i) % 2 ** 32, tuple(stop)))
        res = await run(request, rows)
        if not isinstance(res, list):
            return res
        choices = []
        for i, r in enumerate(res):
            lp = None
            if body.logprobs is not None:
                pieces = [tok.decode([t]) for t in r.tokens]
                offsets = list(np.cumsum([0] + [len(p) for p in pieces[:-1]]).astype(int)) if pieces else []
                lp = {"tokens": pieces, "token_logprobs": r.logprobs, "top_logprobs": None,
                      "text_offset": [int(o) for o in offsets]}
            choices.append({"text": r.text, "index": i, "logprobs": lp, "finish_reason": r.finish_reason})
        n_prompt = sum(len(r.ids) for r in rows)
        n_new = sum(len(r.tokens) for r in res)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    return app


class _BodyLimit:
    """ASGI middleware: a request whose Content-Length is over `limit` bytes (or not a number) gets 413 unread."""

    def __init__(self, app, limit: int, error):
        self.app, self.limit, self.error = app, limit, error

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope.get("headers") or []).get(b"content-length")
            if size is not None and (not size.isdigit() or int(size) > self.limit):
                response = self.error(413, f"request body of {size.decode(errors='replace')} bytes; at most "
                                           f"{self.limit} are accepted")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ServerThread:
    """uvicorn serving `app` on host:port in a background thread (tests, benchmarks); `stop()` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5, access_log=False,
                                                    limit_concurrency=1000))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
