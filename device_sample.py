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
    from mesh_transformer.loading import add_model_flags
    add_model_flags(p)
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
    a("--seed", type=int, default=0, help="sampling seed: the same seed and flags give the same samples")
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
    from mesh_transformer.loading import sampler_from_args

    if args.max_new_tokens < 1 or args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--max-new-tokens, --num-samples and --batch-size must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    prompts = read_prompts(args)
    sampler, tokenizer = sampler_from_args(args)

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
