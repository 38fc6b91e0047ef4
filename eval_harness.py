"""Evaluate a GPT-J with EleutherAI's lm-evaluation-harness (lm-eval 0.4): mesh-transformer-jax's `eval_harness.py`
on today's JAX. The model is ours (mesh_transformer/lm_eval_adapter.py: batched, sorted by length, on the
('dp','mp') mesh, rolling windows of `seq` tokens for perplexity tasks); tasks, prompts and metrics are lm-eval's.

The model comes from (first that applies): --hf (a Hugging Face GPT-J folder), --ckpt (a v1 checkpoint folder), the
config's checkpoint folder (bucket/model_dir), latest step; else a randomly initialised model (a warning says so).

The zero-shot table of mesh-transformer-jax's README (GPT-J-6B: LAMBADA, Winogrande, HellaSwag, PIQA), for a user
with the weights and the network (lm-eval downloads the datasets from the HF hub on first use):

  HF_HUB_OFFLINE=0 python eval_harness.py --ckpt step_383500/ --config configs/6B_roto_256.json \\
      --tasks lambada_openai,winogrande,hellaswag,piqa --num-fewshot 0 --batch-size 8 --output-path results/gptj.json
  HF_HUB_OFFLINE=0 python eval_harness.py --hf ./gpt-j-6b --tasks lambada_openai,winogrande,hellaswag,piqa

Offline, point --include-path at a folder of task YAMLs over local files (dataset_path: json, data_files: ...).
"""
import argparse
import json
import os
import sys

from mesh_transformer.cli_util import (ERRORS_EPILOG, add_compile_cache_flag, run_main, setup_compile_cache,
                                        setup_logging)

README_TASKS = "lambada_openai,winogrande,hellaswag,piqa"


def parse_args(argv=None):
    from mesh_transformer.loading import add_model_flags

    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    a = p.add_argument
    a("--tasks", default=None, help=f"comma-separated lm-eval task (or group) names (default: the config's "
                                    f"eval_harness_tasks, else the README's {README_TASKS})")
    a("--num-fewshot", type=int, default=0, help="few-shot examples per prompt (default: 0, the README's zero-shot)")
    a("--limit", type=float, default=None, help="evaluate only this many documents per task (or this fraction when "
                                                "< 1); for quick checks, not for reported numbers")
    a("--batch-size", type=int, default=8, help="rows per scoring / generation batch (rounded up to the dp size)")
    a("--max-gen-toks", type=int, default=256, help="new tokens at most for generate_until tasks that set none "
                                                    "(lm-eval's default: 256)")
    a("--output-path", default=None, help="write the results JSON here (a .json file, or a folder that gets "
                                          "results.json); per-document samples too with --log-samples")
    a("--log-samples", action="store_true", help="also write every request and the model's answer "
                                                 "(samples_<task>.jsonl beside the results)")
    a("--include-path", default=None, help="a folder of extra lm-eval task YAMLs (e.g. over local JSONL files)")
    a("--bootstrap-iters", type=int, default=100000, help="bootstrap resamples for the standard errors "
                                                          "(lm-eval's default; 0 = none, faster)")
    a("--seed", type=int, default=0, help="seed of lm-eval's few-shot sampling and of a random init")
    add_compile_cache_flag(p)
    return p.parse_args(argv)


def _output_files(path: str) -> tuple:
    if path.endswith(".json"):
        folder = os.path.dirname(path) or "."
        return folder, path
    return path, os.path.join(path, "results.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    setup_compile_cache(args.compile_cache)
    if args.batch_size < 1 or args.num_fewshot < 0 or (args.limit is not None and args.limit <= 0):
        raise ValueError("--batch-size must be >= 1, --num-fewshot >= 0 and --limit > 0")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from mesh_transformer.lm_eval_adapter import MeshTransformerLM
    from mesh_transformer.loading import sampler_from_args

    if args.include_path and not os.path.isdir(args.include_path):
        raise FileNotFoundError(f"--include-path {args.include_path} is not a folder of task YAMLs")
    tasks = args.tasks
    if tasks is None and args.config and not args.hf:
        from mesh_transformer.config import load_config
        configured = load_config(args.config).eval_harness_tasks
        tasks = ",".join(configured) if configured else None
    names = [t.strip() for t in (tasks or README_TASKS).split(",") if t.strip()]
    # lm-eval's own task index (thousands of YAMLs) takes seconds to build: only when a task is not a local one
    task_manager = TaskManager(include_path=args.include_path, include_defaults=False) if args.include_path else None
    if task_manager is None or any(t not in task_manager.all_tasks for t in names):
        task_manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in names if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; names are lm-eval's (e.g. {README_TASKS}); "
                         f"local tasks need --include-path")

    sampler, tokenizer = sampler_from_args(args, what="evaluating")
    lm = MeshTransformerLM(sampler, tokenizer, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=limit,
                                      task_manager=task_manager, log_samples=args.log_samples,
                                      random_seed=args.seed, numpy_random_seed=args.seed,
                                      torch_random_seed=args.seed, fewshot_random_seed=args.seed,
                                      bootstrap_iters=args.bootstrap_iters)
    print(make_table(results))
    if args.output_path:
        folder, path = _output_files(args.output_path)
        os.makedirs(folder, exist_ok=True)
        samples = results.pop("samples", None) or {}
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        for task, rows in samples.items():
            with open(os.path.join(folder, f"samples_{task}.jsonl"), "w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=str) + "\n")
        print(f"results written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
