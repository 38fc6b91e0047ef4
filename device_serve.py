"""Serve completions of a GPT-J over HTTP: mesh-transformer-jax's `device_serve.py` on today's JAX, with FastAPI +
uvicorn instead of Flask's development server (an ASGI server keeps thousands of waiting clients on one event loop;
one worker thread owns the model and runs the gathered requests as one batch; mesh_transformer/serving.py).

The model comes from (first that applies): --hf (a Hugging Face GPT-J folder), --ckpt (a v1 checkpoint folder), the
config's checkpoint folder (bucket/model_dir), latest step; else a randomly initialised model (a warning says so).

Routes:
  POST /complete         the original's: {"context": str, "top_p": 0.9, "temp": 0.75} -> {"completion": str}
                         (up to --complete-max-tokens new tokens, fewer when the context leaves less room)
  POST /v1/completions   OpenAI-style: prompt (string or list), max_tokens, temperature, top_p, top_k, stop, seed,
                         logprobs -> {"choices": [{"text", "finish_reason", "logprobs"}], "usage": ...}
  GET  /health           status, queue length, counters

  python device_serve.py --config configs/6B_roto_256.json --ckpt step_383500/ --port 5000
  curl -s localhost:5000/complete -H 'Content-Type: application/json' \\
      -d '{"context": "EleutherAI is", "top_p": 0.9, "temp": 0.75}'
  curl -s localhost:5000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "EleutherAI is", "max_tokens": 32, "temperature": 0, "stop": ["\\n"]}'
"""
import argparse
import sys

from mesh_transformer.cli_util import (ERRORS_EPILOG, add_compile_cache_flag, run_main, setup_compile_cache,
                                        setup_logging)


def parse_args(argv=None):
    from mesh_transformer.loading import add_model_flags

    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    a = p.add_argument
    a("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; the "
                                          "original listened on 0.0.0.0, every interface)")
    a("--port", type=int, default=5000, help="port to listen on (default: 5000, as the original)")
    a("--max-batch", type=int, default=16, help="rows (prompts) per sampler batch at most (default: 16)")
    a("--max-queue", type=int, default=100, help="rows waiting at most; beyond, requests get 503 with Retry-After "
                                                 "(default: 100, the original's queue limit)")
    a("--batch-wait-ms", type=float, default=5.0, help="how long the first waiting request waits for others to "
                                                       "share its batch (default: 5 ms; each arrival restarts the "
                                                       "wait, up to 4x in all, and up to 10x while the clients of "
                                                       "the last batch are expected back)")
    a("--complete-max-tokens", type=int, default=512, help="new tokens of a /complete answer (original: 512)")
    a("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default: 1 MiB)")
    a("--cors", action="store_true", help="allow browser pages of any origin to call the server (the original "
                                          "allowed them on /complete); off by default")
    a("--model-name", default=None, help="the model name in /v1/completions answers (default: the source path)")
    a("--seed", type=int, default=0, help="seed of a random init (requests carry their own sampling seed)")
    add_compile_cache_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    setup_compile_cache(args.compile_cache)
    if args.max_batch < 1 or args.max_queue < 1 or args.batch_wait_ms < 0 or args.complete_max_tokens < 1:
        raise ValueError("--max-batch, --max-queue and --complete-max-tokens must be >= 1, --batch-wait-ms >= 0")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port} is not a port number (0-65535)")
    import uvicorn

    from mesh_transformer.loading import sampler_from_args
    from mesh_transformer.serving import BatchEngine, make_app

    sampler, tokenizer = sampler_from_args(args, what="serving")
    engine = BatchEngine(sampler, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                         wait_ms=args.batch_wait_ms)
    name = args.model_name or args.hf or args.ckpt or args.config
    app = make_app(engine, model_name=str(name), complete_max_tokens=args.complete_max_tokens, cors=args.cors,
                   max_body_bytes=args.max_body_bytes)
    print(f"serving {name} on http://{args.host}:{args.port} (POST /complete, POST /v1/completions, GET /health)",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=5, access_log=False)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
