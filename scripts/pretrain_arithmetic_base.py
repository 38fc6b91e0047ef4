"""Trains the small base model of the CPU demo: a tiny GPT-J that has learned the scratchpad format on small sums.

GPT-J-6B comes to STaR already able to follow a few-shot prompt, use a hint and add small numbers; a ~0.86M-parameter
model trained from nothing cannot. This script gives the demo that starting point, reproducibly. It trains the demo
config from scratch (or, with `--init`, continues a checkpoint) on:

- annotated problems: for each digit count in `--digits`, `--n-per-digit` problems (a comma list, one count per digit
  count) with their Nye et al. scratchpads; a share `--p-hint` of the questions carry the answer hint, so the model
  learns what a hint is (rationalization needs that);
- the addition table as short documents, `--n-facts` of them: `7 + 5 , ` -> `1 2`. The sum digit is one token in ~60 of
  a scratchpad, so a tiny model sees few examples of the lookup per step; these dense documents teach it sooner.

The demo's held-out questions with `--hold-out-digits` digits are excluded. The params (float32, v1 checkpoint layout,
one shard) go to `--out`, with `pretrain_info.json` (the command, the arguments, the time, the held-out accuracy per
digit count of the arithmetic task's dev questions as iteration_train.py evaluates them, and the `--init` stage's own
info) and `pretrain_pairs.jsonl` (the training examples, which STaR fine-tunes can replay: `--replay_file`).

The demo's base is three runs of this script: stage 1 with its defaults, stage 2 continuing it on more 2- and 3-digit
problems, and stage 3 continuing that on mostly 3-digit problems, stopped partway down its schedule (`--anneal-steps`)
where 3-digit sums have just begun to come out right. `bash scripts/make_arithmetic_base.sh` (~55 min on one CPU
core) runs all three.

  python scripts/pretrain_arithmetic_base.py --out /tmp/stage1          # stage 1 (~25 min on one CPU core)
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from star.loop import PRETRAIN_PAIRS as PAIRS_FILE  # noqa: E402  (iteration_train.py replays this file by default)


def int_list(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "star_arithmetic_tiny.json"),
                   help="model config of the demo")
    p.add_argument("--out", required=True,
                   help="output checkpoint folder (the demo's, assets/arithmetic_base, is made by "
                        "scripts/make_arithmetic_base.sh)")
    p.add_argument("--digits", default="1,2,3", help="digit counts of the annotated training problems")
    p.add_argument("--n-per-digit", default="3000,1500,300",
                   help="annotated problems per digit count, one number per --digits entry (or one for all)")
    p.add_argument("--n-facts", type=int, default=6000, help="addition-table documents (`x + y , ` -> the sum)")
    p.add_argument("--p-hint", type=float, default=0.3, help="share of training questions shown with the hint")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (the config's seq tokens each)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate (cosine to lr/10 over --anneal-steps, then constant)")
    p.add_argument("--anneal-steps", type=int, default=None,
                   help="steps of the cosine schedule, as the config key anneal_steps (default: --steps). Larger than "
                        "--steps stops the run partway down its schedule: where the base has just begun a skill")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--n-eval", type=int, default=100, help="held-out questions per digit count (1-3 digits)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the problems, the hints and the initialisation")
    p.add_argument("--hold-out-digits", default="2,3",
                   help="digit counts whose demo dev questions are kept out of pretraining. 1-digit sums are not held "
                        "out by default: only 81 exist, and they are the addition table the scratchpad is built from "
                        "(GPT-J knows it too)")
    p.add_argument("--init", default=None,
                   help="start from this checkpoint instead of a random init (a second stage: continue a base on "
                        "another data mix; give that stage its own --seed so it draws new problems)")
    p.add_argument("--eval-only", action="store_true", help="only re-evaluate the base already in --out")
    args = p.parse_args(argv)
    args.digit_list = int_list(args.digits)
    counts = int_list(args.n_per_digit)
    if len(counts) == 1:
        counts = counts * len(args.digit_list)
    if len(counts) != len(args.digit_list):
        p.error(f"--n-per-digit has {len(counts)} numbers for {len(args.digit_list)} --digits; give one per digit "
                f"count or a single number")
    args.counts = counts
    return args


def training_pairs(args, held_out: set) -> list:
    """(context, completion) pairs: the annotated problems of each digit count, then the addition-table documents."""
    import random

    from star.tasks import get_task
    rng = random.Random(args.seed)
    pairs = []
    for digits, n in zip(args.digit_list, args.counts):
        task = get_task("arithmetic", min_digits=digits, max_digits=digits, n_train=n, n_dev=0, n_exemplars=0,
                        seed=args.seed)  # seeded unlike the demo's task (seed 0), whose dev set stays held out
        pairs += [(task.format_question(ex, hint=rng.random() < args.p_hint), task.reference_completion(ex))
                  for ex in task.load("train") if ex.question not in held_out]
    for _ in range(args.n_facts):
        x, y = rng.randrange(10), rng.randrange(10)
        pairs.append((f"{x} + {y} , ", " ".join(str(x + y)) + "\n"))
    return pairs


def main(argv=None):
    args = parse_args(argv)
    from mesh_transformer.cli_util import setup_logging
    setup_logging()
    import jax
    import numpy as np

    from mesh_transformer import checkpoint as ckpt
    from mesh_transformer.config import load_config
    from mesh_transformer.finetune import RunOptions, train
    from star.backend import GenerationSettings, JaxBackend, pack_examples
    from star.rationales import PassOptions, accuracy_by_class, run_pass
    from star.tasks import get_task

    cfg = load_config(args.config)
    # the demo's held-out questions: iteration_train.py's arithmetic defaults (1-3 digits, seed 0)
    eval_task = get_task("arithmetic", min_digits=1, max_digits=3, n_dev=args.n_eval, n_exemplars=0, seed=0)
    dev = eval_task.load("dev")
    hold_out = {d.strip() for d in args.hold_out_digits.split(",") if d.strip()}
    held_out = {ex.question for ex in dev if eval_task.answer_classes(ex) in hold_out}
    pairs = training_pairs(args, held_out)
    init_info = None  # read now: --out may be the --init folder, which is replaced below
    if args.init and os.path.exists(os.path.join(args.init, "pretrain_info.json")):
        with open(os.path.join(args.init, "pretrain_info.json")) as f:
            init_info = json.load(f)
    t0 = time.time()
    train_seconds = last_lr = None
    with tempfile.TemporaryDirectory() as work:
        if args.eval_only:
            backend = JaxBackend(cfg, None, GenerationSettings(batch_size=150))
            params, _, _, _ = ckpt.load_checkpoint(args.out, cfg, with_opt=False)
        else:
            # the LR anneals over the run, or --anneal-steps (the demo config's schedule is for the STaR fine-tunes)
            run_cfg = cfg.replace(total_steps=args.steps, anneal_steps=args.anneal_steps or args.steps, ckpt_every=0,
                                  lr=args.lr, end_lr=args.lr / 10, warmup_steps=args.warmup,
                                  per_replica_batch=args.batch)
            backend = JaxBackend(run_cfg, None, GenerationSettings(batch_size=150))
            index = pack_examples(pairs, backend.tokenizer, cfg.seq, os.path.join(work, "records"), "pretrain",
                                  seed=args.seed)
            init = None
            if args.init:
                init, _, _, _ = ckpt.load_checkpoint(args.init, cfg, with_opt=False)
            state = train(run_cfg.replace(train_set=index),
                          RunOptions(ckpt_path=os.path.join(work, "ckpt"), total_steps=args.steps, seed=args.seed,
                                     init_params=init, desc="pretrain"), trainer=backend.trainer)
            params = jax.tree.map(np.asarray, state.params)
            train_seconds = round(time.time() - t0, 1)
            last_lr = float(backend.trainer.schedule(args.steps - 1))  # where the run left its schedule
            if os.path.exists(args.out):
                shutil.rmtree(args.out)
            ckpt.save_checkpoint(args.out, params, args.steps, cfg, shards=1)  # saved before the evaluation
            # the training data beside the params: STaR fine-tunes can replay a slice of it (--replay_file)
            with open(os.path.join(args.out, PAIRS_FILE), "w") as f:
                f.writelines(json.dumps({"context": c, "completion": t}) + "\n" for c, t in pairs)
        records = run_pass(eval_task, dev, backend.generate_fn(params),
                           PassOptions(gen_length=eval_task.default_gen_length, chunk_size=150, desc="eval base"),
                           os.path.join(work, "eval.jsonl"))
    accuracy = accuracy_by_class(records)
    info = {"command": "python scripts/pretrain_arithmetic_base.py " + " ".join(argv or sys.argv[1:]),
            "args": {k: v for k, v in vars(args).items() if k not in ("digit_list", "counts")},
            "train_examples": len(pairs), "train_seconds": train_seconds, "last_lr": last_lr,
            "held_out_accuracy": accuracy}
    if init_info is not None:  # the stage this one continued, so the file tells the whole recipe
        info["init_info"] = init_info
    info_path = os.path.join(args.out, "pretrain_info.json")
    if args.eval_only and os.path.exists(info_path):
        with open(info_path) as f:
            info = {**json.load(f), "held_out_accuracy": accuracy}
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    from mesh_transformer.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # before jax: malloc tunables for XLA:CPU (host_malloc.py)
    main()
