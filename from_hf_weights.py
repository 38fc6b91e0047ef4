"""Convert a Hugging Face GPT-J folder into a v1 checkpoint (params only) and a config to train it with.

  python from_hf_weights.py --hf-path ./gpt-j-6B --output-ckpt ckpts/gptj_base --base-config configs/qa_base.json
  python device_train.py --config ckpts/gptj_base.json --tune-model-path ckpts/gptj_base

Reads config.json + model.safetensors (or a sharded safetensors index, or pytorch_model.bin) of a GPTJForCausalLM.
Writes a checkpoint folder (meta.json + step_0/shard_s/j.npz, mtj's layout, params only) and a JSON config with the
model's shapes from config.json (layers, d_model, n_heads, n_vocab, pe_rotary_dims, d_ff) and every other key -
seq, batch, schedule, data, model_dir, tokenizer, ... - from --base-config (seq defaults to n_positions). Nothing is
written when the HF folder or the base config is wrong, and an existing checkpoint is never overwritten.
"""
import argparse
import logging
import sys

from mesh_transformer.cli_util import ERRORS_EPILOG, run_main, setup_logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", required=True, metavar="DIR",
                   help="local folder of an HF GPT-J model (config.json + weights), e.g. from save_pretrained")
    p.add_argument("--output-ckpt", required=True, metavar="PATH",
                   help="checkpoint folder to write (local or gs://); it must not hold a checkpoint yet")
    p.add_argument("--output-config", default=None, metavar="FILE",
                   help="where to write the config JSON (local); default: beside the checkpoint, "
                        "OUTPUT_CKPT + '.json'")
    p.add_argument("--base-config", default=None, metavar="FILE",
                   help="JSON config (or preset name) giving the training keys (seq, per_replica_batch, lr, ..., "
                        "train_set, model_dir, tokenizer); its shape keys are replaced by the HF ones. Default: "
                        "defaults of every training key, seq = n_positions")
    p.add_argument("--shards", type=int, default=None,
                   help="number of shard folders (a divisor of n_heads, n_vocab and d_ff); default: the config's "
                        "cores_per_replica (1 without --base-config)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="dtype of the written params (default: fp32; training casts them to fp32 anyway)")
    args = p.parse_args(argv)
    from mesh_transformer import flag_checks as fc
    fc.check(args, {"--shards": fc.at_least(1)}, "from_hf_weights.py")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from mesh_transformer.convert import default_config_path, hf_to_checkpoint, write_config_json

    config_path = args.output_config or default_config_path(args.output_ckpt)
    cfg, _ = hf_to_checkpoint(args.hf_path, args.output_ckpt, base=args.base_config, shards=args.shards,
                              dtype=args.dtype)
    write_config_json(cfg, config_path)
    logging.getLogger("from_hf_weights").info("wrote %s/step_0 and config %s (layers %d, d_model %d, n_vocab %d)",
                                              args.output_ckpt.rstrip("/"), config_path, cfg.layers, cfg.d_model,
                                              cfg.n_vocab)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
