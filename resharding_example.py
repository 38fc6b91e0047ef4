"""Load a v1 checkpoint saved with any number of shards (e.g. the released 8-shard GPT-J-6B slim weights) onto the
local devices, whatever their number (one GPU, a CPU), and sample from it. mesh-transformer-jax's
`resharding_example.py`, on today's JAX: the shards are joined on the host and placed on a ('dp','mp') mesh.

  python resharding_example.py --config configs/6B_roto_256.json --ckpt ./step_383500/ --cores-per-replica 1 \\
      --prompt "EleutherAI is"
"""
import argparse
import sys

from mesh_transformer.cli_util import ERRORS_EPILOG, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/6B_roto_256.json", help="model config of the checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint folder: holds meta.json, or is a step_N/ folder")
    p.add_argument("--cores-per-replica", type=int, default=None,
                   help="model-parallel size on THIS machine (default: all local devices, or 1 on CPU)")
    p.add_argument("--prompt", default="EleutherAI is", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--tokenizer", default=None, help="override the config's tokenizer (byte, gpt2 or a folder)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    from mesh_transformer import flag_checks as fc
    fc.check(args, {"--cores-per-replica": fc.at_least(1), "--max-new-tokens": fc.at_least(1),
                    "--temperature": fc.at_least(0), "--top-p": fc.Range(lo=0, hi=1, lo_open=True)},
             "resharding_example.py")
    return args


def main(argv=None):
    args = parse_args(argv)
    from mesh_transformer.cli_util import setup_logging
    setup_logging()
    import time

    import jax

    from mesh_transformer import checkpoint as ckpt
    from mesh_transformer.config import load_config
    from mesh_transformer.model import CausalTransformer
    from mesh_transformer.sampling import Sampler
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.tokenizer import get_tokenizer

    cfg = load_config(args.config)
    mp = args.cores_per_replica or (jax.local_device_count() if jax.default_backend() != "cpu" else 1)
    cfg = cfg.replace(cores_per_replica=mp, **({"tokenizer": args.tokenizer} if args.tokenizer else {}))
    t0 = time.time()
    params, _, step, _ = ckpt.load_checkpoint(args.ckpt, cfg, with_opt=False)
    print(f"loaded step {step} from {args.ckpt} in {time.time() - t0:.1f}s; resharded to mp={mp} over "
          f"{jax.local_device_count()} local device(s)")
    sampler = Sampler(CausalTransformer(cfg), params, mesh=make_mesh(mp))
    out = sampler.generate([args.prompt], get_tokenizer(cfg.tokenizer), max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, stop=(), seed=args.seed, batch_size=1)
    print(args.prompt + out[0])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
