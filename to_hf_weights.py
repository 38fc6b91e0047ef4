"""Convert a v1 checkpoint into a Hugging Face GPT-J folder, as mesh-transformer-jax's `to_hf_weights.py`.

  python to_hf_weights.py --input-ckpt ./step_383500 --config ./configs/6B_roto_256.json --output-path ./gpt-j-6B \
      --cpu --dtype fp32

Writes config.json + model.safetensors (the original wrote pytorch_model.bin); load it with
`transformers.GPTJForCausalLM.from_pretrained(output_path)`. Works on slim (params-only) and full checkpoints, with
any number of shards; the conversion is plain numpy, so it needs no accelerator. The eos/bos ids in config.json are
the EOS of the config's tokenizer (GPT-2's 50256 when it cannot be loaded).
"""
import argparse
import logging
import os
import sys

from mesh_transformer.cli_util import ERRORS_EPILOG, run_main, setup_logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-ckpt", "--input_ckpt", required=True, metavar="PATH",
                   help="checkpoint to convert: a step folder such as gs://bucket/path/step_383500 (holding shard_0, "
                        "...), or a checkpoint folder holding meta.json (its latest step, or --ckpt-step)")
    p.add_argument("--config", required=True, metavar="PATH",
                   help="the JSON config of the checkpoint (layers, d_model, n_heads, n_vocab, pe_rotary_dims, seq, "
                        "tokenizer)")
    p.add_argument("--output-path", "--output_path", required=True, metavar="PATH",
                   help="local folder to write config.json and model.safetensors to (created if missing)")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU (kept for compatibility: the conversion never uses an accelerator)")
    p.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"),
                   help="dtype of the written weights (default: fp16, as the original)")
    p.add_argument("--ckpt-step", type=int, default=None,
                   help="with a checkpoint folder: the step to convert (default: the latest in meta.json)")
    p.add_argument("--debug", action="store_true", help="verbose logging")
    args = p.parse_args(argv)
    from mesh_transformer import flag_checks as fc
    fc.check(args, {"--ckpt-step": fc.at_least(0)}, "to_hf_weights.py")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing here needs an accelerator; do not grab one
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    from mesh_transformer.config import load_config
    cfg = load_config(args.config)
    from mesh_transformer.convert import checkpoint_to_hf

    step = checkpoint_to_hf(args.input_ckpt, cfg, args.output_path, dtype=args.dtype, step=args.ckpt_step)
    logging.getLogger("to_hf_weights").info("wrote %s from step %d", args.output_path, step)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
