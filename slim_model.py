"""Make a params-only ("slim") copy of a training checkpoint, as mesh-transformer-jax's `slim_model.py`.

A full checkpoint holds the params and the Adam state in fp32 (GPT-J-6B: 861 leaves per shard, ~70 GB); the slim
copy holds only the params, cast to bfloat16 (or float16 with --f16): 287 leaves, ~12 GB, enough for inference,
to_hf_weights.py and fine-tuning with a fresh optimizer (device_train.py --tune-model-path). The copy keeps the
step number and may use any number of shards (--shards).

  python slim_model.py --config configs/6B_roto_256.json                    # latest step of the config's folder
  python slim_model.py --config cfg.json --input-ckpt runs/x/ckpt --output-ckpt runs/x/slim --shards 1

Like the original, the default input is the config's checkpoint folder (gs://{bucket}/{model_dir}) and the default
output is that folder + "_slim" ("_slim_f16" with --f16). Paths may be local or gs://.
"""
import argparse
import logging
import sys

from mesh_transformer.cli_util import ERRORS_EPILOG, run_main, setup_logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="the JSON config the checkpoint was trained with (its shape keys must match the checkpoint)")
    p.add_argument("--ckpt-step", type=int, default=-1,
                   help="step to convert; -1 (default) converts the latest step named in meta.json")
    p.add_argument("--f16", action="store_true", default=False,
                   help="cast to float16 instead of bfloat16 (output suffix _slim_f16)")
    p.add_argument("--input-ckpt", default=None,
                   help="checkpoint folder to read (holding meta.json), or a step_N folder; default: the config's "
                        "checkpoint folder (gs://{bucket}/{model_dir}, or model_dir when bucket is empty)")
    p.add_argument("--output-ckpt", default=None,
                   help="checkpoint folder to write (must not hold a checkpoint yet); default: the input folder + "
                        "'_slim' ('_slim_f16' with --f16)")
    p.add_argument("--shards", type=int, default=None,
                   help="number of shard folders to write (a divisor of n_heads, n_vocab and d_ff); default: the "
                        "config's cores_per_replica")
    args = p.parse_args(argv)
    from mesh_transformer import flag_checks as fc
    fc.check(args, {"--ckpt-step": fc.at_least(0, also=(-1,)), "--shards": fc.at_least(1)}, "slim_model.py")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from mesh_transformer.config import load_config
    cfg = load_config(args.config)
    from mesh_transformer import checkpoint as ckpt
    from mesh_transformer.convert import slim_checkpoint

    src = (args.input_ckpt or ckpt.checkpoint_dir(cfg)).rstrip("/")
    dst = args.output_ckpt or src + ("_slim_f16" if args.f16 else "_slim")
    step = slim_checkpoint(src, dst, cfg, step=None if args.ckpt_step < 0 else args.ckpt_step, shards=args.shards,
                           dtype="fp16" if args.f16 else "bf16")
    logging.getLogger("slim_model").info("wrote %s/step_%d", dst.rstrip("/"), step)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
