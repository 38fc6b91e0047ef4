"""Fine-tune or train a GPT-J on TFRecords, as mesh-transformer-jax's `device_train.py` (same flags and configs).

  python device_train.py --config configs/example_config.json --tune-model-path gs://bucket/step_383500/
  python device_train.py --config my_training_keys.json --hf ./Qwen2.5-0.5B     # an HF Llama/Qwen2/Mistral/GPT-J

Where it starts: from the config's checkpoint folder (gs://{bucket}/{model_dir}, or model_dir as a local path or URL
when bucket is empty) when that holds a checkpoint - an interrupted run resumes exactly, loader position included;
else from --tune-model-path (the LR schedule restarts at step 0); else from a random initialisation (--seed).
Before it loads anything it checks that the train step fits the devices' memory (XLA's analysis of the step compiled
on abstract shapes; `python -m mesh_transformer.memory` prints the figures), and stops naming the knobs to turn if
not. It checkpoints every ckpt_every steps and at the end, validates every val_every steps on each val_set, and appends
one JSON line per step (loss, lr, grad_norm, tokens_per_s, mfu, val losses) to {model_dir}/metrics.jsonl, or to
./logs/{name}.metrics.jsonl when model_dir is a gs:// URL.

One run owns a model_dir: a second writer stops at once naming the holder (run.lock). The folder records what
defines its results (run_identity.json: config, start checkpoint, code version); a rerun with other settings
refuses and lists the differences (--force-new / --resume-anyway). A non-finite loss or grad norm stops training
before the next checkpoint; a damaged latest step falls back to the newest one that loads.

Several hosts (docs/SCALING.md): start the same command on every host with --coordinator-address HOST:PORT
--num-processes N --process-id I (or --distributed auto on a TPU pod slice or under SLURM); the mesh then spans all
hosts' devices, each host reads only its rows of every batch, and the checkpoint folder (gs://, or a file system all
hosts share) gets each host's shards, committed by process 0. train.py starts such a run on a Ray cluster.
"""
import argparse
import logging
import sys

from mesh_transformer.cli_util import (ERRORS_EPILOG, add_compile_cache_flag, add_distributed_flags, run_main,
                                      setup_compile_cache, setup_logging)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="JSON config with the mtj keys (e.g. configs/example_config.json) or a preset name (tiny)")
    p.add_argument("--tune-model-path", default=None,
                   help="v1 checkpoint folder (local or gs://; a folder holding meta.json, or a step_N folder) to "
                        "fine-tune from when the config's own folder has no checkpoint yet; the LR schedule restarts "
                        "at step 0, as the original")
    p.add_argument("--hf", default=None,
                   help="Hugging Face folder (config.json + safetensors) of a GPTJ, Llama, Qwen2 or "
                        "MistralForCausalLM to fine-tune: the model's keys (family, shapes, rope, dtype) come from its "
                        "config.json, every other key from --config, and the folder is the starting point (as "
                        "--tune-model-path, with a fresh Adam state). A Llama-family run checkpoints each step as an "
                        "HF folder (model_dir/step_N/, loadable by from_pretrained) plus optimizer.safetensors")
    p.add_argument("--fresh-opt", action="store_true", default=False,
                   help="with --tune-model-path: start with a fresh Adam state instead of the checkpoint's")
    p.add_argument("--seed", type=int, default=0, help="random seed of a from-scratch initialisation (default: 0)")
    p.add_argument("--total-steps", type=int, default=None, help="override the config's total_steps")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs and metrics JSONL still written)")
    p.add_argument("--force-new", action="store_true",
                   help="the model_dir holds a run with other settings (run_identity.json): delete its steps, "
                        "meta.json and metrics and start over there")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume the model_dir's run although its recorded settings differ (the difference is "
                        "appended to run_identity.json)")
    p.add_argument("--recover-meta", action="store_true",
                   help="the model_dir has step folders but no readable meta.json: rebuild meta.json from the "
                        "complete steps (loader position replayed) and resume from the newest")
    add_compile_cache_flag(p)
    add_distributed_flags(p)
    from mesh_transformer import wandb_log
    wandb_log.add_flags(p)
    args = p.parse_args(argv)
    if args.hf and args.tune_model_path:
        p.error("give --hf or --tune-model-path, not both: --hf is the starting point")
    from mesh_transformer import flag_checks as fc
    fc.check(args, {"--total-steps": fc.at_least(0)}, "device_train.py")
    return args


def run(args, argv=None):
    """Trains as the parsed flags say; returns the final TrainState (global arrays in a multi-process run)."""
    from mesh_transformer.config import load_config
    if args.hf:  # the model from the folder, the training keys from --config
        from mesh_transformer.loading import hf_config
        cfg = hf_config(args.hf, args.config)
        args.tune_model_path, args.fresh_opt = args.hf, True
    else:
        cfg = load_config(args.config)  # before the heavy imports: a bad config fails at once
    setup_compile_cache(args.compile_cache)
    from mesh_transformer import distributed
    distributed.initialize_from_args(args)  # before anything touches a device; nothing happens without the flags

    from mesh_transformer import wandb_log
    from mesh_transformer.finetune import RunOptions, train
    if distributed.is_main():
        wandb_log.configure(args.wandb_project or cfg.wandb_project, args.wandb_mode, args.wandb_dir, cfg.name,
                            {"argv": sys.argv[1:] if argv is None else list(argv)})
    try:
        state = train(cfg, RunOptions(tune_model_path=args.tune_model_path, fresh_opt=args.fresh_opt, seed=args.seed,
                                      total_steps=args.total_steps, progress=not args.no_progress, memory_check=True,
                                      force_new=args.force_new, resume_anyway=args.resume_anyway,
                                      recover_meta=args.recover_meta))
    finally:
        wandb_log.finish()
    logging.getLogger("device_train").info("done at step %d", int(state.step))
    return state


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    run(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
