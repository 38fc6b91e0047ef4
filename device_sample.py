"""Sample continuations of prompts from a GPT-J checkpoint: mesh-transformer-jax's `device_sample.py` on today's JAX.

The model comes from (first that applies): --hf (a Hugging Face GPT-J folder), --ckpt (a v1 checkpoint folder), or
the config's checkpoint folder (bucket/model_dir), latest step; with no checkpoint there, a randomly initialised model
(a warning says so), which is enough to try the tool on a tiny config.
Prompts: each --prompt, each --prompt-file (a whole file is one prompt), else one prompt per line of stdin.

  python device_sample.py --config configs/6B_roto_256.json --prompt "EleutherAI is"
  echo "The capital of France is" | python device_sample.py --hf ./gpt-j-6b --temperature 0 --max-new-tokens 16
"""
import argparse
import codecs
import json
import sys


def parse_args(argv=None):
    from mesh_transformer.cli_util import ERRORS_EPILOG, add_compile_cache_flag
    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", default=None, help="model config: a JSON file in mesh-transformer-jax's format or a preset name "
                                     "(gptj-6b, tiny); required unless --hf is given")
    a("--ckpt", default=None, help="v1 checkpoint folder (holding meta.json, or a step_N folder) to load; default: "
                                   "the config's bucket/model_dir, or a random init when that holds no checkpoint")
    a("--ckpt-step", type=int, default=None, help="checkpoint step to load (default: the latest)")
    a("--hf", default=None, help="Hugging Face GPT-J folder (config.json + safetensors) to load instead of a "
                                 "checkpoint; --config then only supplies training keys, if given")
    a("--prompt", action="append", default=[], help="a prompt to continue (repeat the flag for several)")
    a("--prompt-file", action="append", default=[], help="a file whose whole text is one prompt (repeatable)")
    a("--max-new-tokens", type=int, default=512, help="new tokens per sample at most (original: 512)")
    a("--temperature", type=float, default=0.75, help="sampling temperature; 0 = greedy (original: 0.75)")
    a("--top-p", type=float, default=0.9, help="nucleus sampling: keep the smallest set of tokens with this much "
                                               "probability; 1 = off (original: 0.9)")
    a("--top-k", type=int, default=0, help="keep only the k most likely tokens; 0 = off")
    a("--stop", action="append", default=[], help="stop a sample when its text contains this string (repeatable; "
                                                  "escapes such as \\n are understood); default: no stop string")
    a("--num-samples", type=int, default=1, help="samples per prompt (each with its own random stream)")
    a("--batch-size", type=int, default=8, help="rows per generation batch")
    a("--tokenizer", default=None, help="byte, gpt2 or a folder with vocab.json + merges.txt (default: the "
                                        "config's tokenizer, or the --hf folder when it holds one)")
    a("--seed", type=int, default=0, help="sampling seed: the same seed and flags give the same samples")
    a("--cores-per-replica", type=int, default=None, help="model-parallel size on this machine (default: the "
                                                          "config's when it divides the device count, else 1)")
    a("--compute-dtype", choices=("float32", "bfloat16"), default=None,
      help="dtype of the matmuls and KV cache (default: the config's, bfloat16; float32 is faster on CPU)")
    a("--jsonl", action="store_true", help="print one JSON object per sample ({prompt, sample, completion}) "
                                           "instead of text")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    from mesh_transformer import flag_checks as fc
    fc.check(args, {"--ckpt-step": fc.at_least(0), "--max-new-tokens": fc.at_least(1), "--temperature": fc.at_least(0),
                    "--top-p": fc.Range(lo=0, hi=1, lo_open=True), "--top-k": fc.at_least(0),
                    "--num-samples": fc.at_least(1), "--batch-size": fc.at_least(1),
                    "--cores-per-replica": fc.at_least(1)}, "device_sample.py")
    return args


def load_model(args):
    """(config, params as host or device arrays) from --hf, --ckpt or the config's checkpoint folder, else random."""
    import os

    import jax

    from mesh_transformer.config import load_config
    from mesh_transformer.model import CausalTransformer

    overrides = {"compute_dtype": args.compute_dtype} if args.compute_dtype else {}
    if args.hf:
        from mesh_transformer.hf import load_hf_gptj

        extra = {}
        if args.config:
            base = load_config(args.config).to_dict()
            shape_keys = ("layers", "d_model", "n_heads", "n_vocab", "seq", "pe_rotary_dims", "d_ff")
            extra = {k: v for k, v in base.items() if k not in shape_keys}
        cfg, params = load_hf_gptj(args.hf, **{**extra, **overrides})
        if not args.tokenizer and os.path.exists(os.path.join(args.hf, "vocab.json")):
            args.tokenizer = args.hf
        print(f"loaded HF GPT-J from {args.hf}", file=sys.stderr)
        return cfg, params
    if not args.config:
        raise ValueError("pass --config (a JSON config or preset name), or --hf with a Hugging Face GPT-J folder")
    cfg = load_config(args.config)
    if overrides:
        cfg = cfg.replace(**overrides)
    try:
        from mesh_transformer import checkpoint as ckpt
    except ImportError as e:  # pragma: no cover - the checkpoint module ships with the repo
        ckpt, why = None, f"checkpoint module unavailable ({e})"
    if ckpt is not None:
        path = args.ckpt
        if path is None and cfg.model_dir:
            path = ckpt.checkpoint_dir(cfg)
        if args.ckpt is not None:  # asked for explicitly: failing to load it is an error
            params, _, step, _ = ckpt.load_checkpoint(path, cfg, step=args.ckpt_step, with_opt=False)
            print(f"loaded {path} step {step}", file=sys.stderr)
            return cfg, params
        if path is not None:
            try:
                params, _, step, _ = ckpt.load_checkpoint(path, cfg, step=args.ckpt_step, with_opt=False)
                print(f"loaded {path} step {step}", file=sys.stderr)
                return cfg, params
            except (FileNotFoundError, ValueError) as e:
                why = f"no checkpoint loaded from {path} ({' '.join(str(e).split())})"
        else:
            why = "the config has no model_dir and no --ckpt was given"
    print(f"warning: {why}; sampling from a RANDOMLY INITIALISED model", file=sys.stderr)
    return cfg, jax.jit(CausalTransformer(cfg).init)(jax.random.PRNGKey(args.seed))


def read_prompts(args) -> list:
    prompts = list(args.prompt)
    for path in args.prompt_file:
        with open(path) as f:
            prompts.append(f.read())
    if not prompts:
        if sys.stdin.isatty():
            print("reading prompts from stdin, one per line (Ctrl-D to end)", file=sys.stderr)
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT, --prompt-file PATH, or lines on stdin")
    return prompts


def main(argv=None):
    args = parse_args(argv)
    from mesh_transformer.cli_util import setup_compile_cache, setup_logging
    setup_logging()
    setup_compile_cache(args.compile_cache)
    import jax

    from mesh_transformer.model import CausalTransformer
    from mesh_transformer.sampling import Sampler
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.tokenizer import get_tokenizer

    if args.max_new_tokens < 1 or args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--max-new-tokens, --num-samples and --batch-size must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    prompts = read_prompts(args)
    cfg, params = load_model(args)
    n_dev = jax.device_count()
    mp = args.cores_per_replica or (cfg.cores_per_replica if n_dev % cfg.cores_per_replica == 0 else 1)
    if n_dev % mp or cfg.n_heads % mp:
        raise ValueError(f"--cores-per-replica {mp} must divide the device count ({n_dev}) and n_heads "
                         f"({cfg.n_heads})")
    tokenizer = get_tokenizer(args.tokenizer or cfg.tokenizer)
    if tokenizer.vocab_size > cfg.n_vocab:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.n_vocab}; pass the --tokenizer the model was trained with")
    sampler = Sampler(CausalTransformer(cfg), params, mesh=make_mesh(mp))
    del params

    texts = [p for p in prompts for _ in range(args.num_samples)]
    stop = tuple(codecs.decode(s, "unicode_escape") for s in args.stop)
    completions = sampler.generate(texts, tokenizer, args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, stop=stop, seed=args.seed,
                                   batch_size=args.batch_size)
    for i, (text, completion) in enumerate(zip(texts, completions)):
        p, s = divmod(i, args.num_samples)
        if args.jsonl:
            print(json.dumps({"prompt": p, "sample": s, "completion": completion}), flush=True)
        else:
            print(f"=== prompt {p}" + (f", sample {s}" if args.num_samples > 1 else "") + " ===")
            print(text + completion, flush=True)
    return 0


if __name__ == "__main__":
    from mesh_transformer.cli_util import run_main
    sys.exit(run_main(main))
