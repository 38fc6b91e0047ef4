"""Trains the small base model of the CPU demo: a tiny GPT-J that has learned the scratchpad format on small sums.

GPT-J-6B comes to STaR already able to follow a few-shot prompt and to use a hint; a ~0.85M-parameter model trained
from nothing cannot. This script gives the demo that starting point, reproducibly: it trains the demo config from
scratch on `--n-per-digit` annotated problems of each digit count in `--digits` (scratchpad completions, a share
`--p-hint` of the questions carrying the answer hint, so the model learns what a hint is), then evaluates it on the
arithmetic task's held-out questions and writes the params (float32, v1 checkpoint layout, one shard) to `--out`.

  python scripts/pretrain_arithmetic_base.py            # writes assets/arithmetic_base (a few minutes on 2 cores)
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "star_arithmetic_tiny.json"),
                   help="model config of the demo")
    p.add_argument("--out", default=os.path.join(REPO, "assets", "arithmetic_base"), help="output checkpoint folder")
    p.add_argument("--digits", default="1,2", help="digit counts of the annotated training problems")
    p.add_argument("--n-per-digit", type=int, default=2000, help="annotated problems per digit count")
    p.add_argument("--p-hint", type=float, default=0.5, help="share of training questions shown with the hint")
    p.add_argument("--steps", type=int, default=1000, help="training steps")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine to lr/10 over the run)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--eval-digits", default="1,2,3", help="digit counts of the held-out evaluation")
    p.add_argument("--n-eval", type=int, default=100, help="held-out questions per digit count")
    p.add_argument("--seed", type=int, default=1234, help="seed of the problems and the initialisation")
    p.add_argument("--hold-out-digits", default="2,3",
                   help="digit counts whose demo dev questions are kept out of pretraining. 1-digit sums are not held "
                        "out by default: only 81 exist, and they are the addition table the scratchpad is built from "
                        "(GPT-J knows it too); without them a tiny model memorizes the pairs it saw and fails the rest")
    p.add_argument("--eval-only", action="store_true", help="only re-evaluate the base already in --out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mesh_transformer.cli_util import setup_logging
    setup_logging()
    import random

    import jax
    import numpy as np

    from mesh_transformer import checkpoint as ckpt
    from mesh_transformer.config import load_config
    from mesh_transformer.finetune import RunOptions, train
    from star.backend import GenerationSettings, JaxBackend, pack_examples
    from star.rationales import PassOptions, accuracy_by_class, run_pass
    from star.tasks import get_task

    digits = [int(d) for d in args.digits.split(",")]
    eval_digits = [int(d) for d in args.eval_digits.split(",")]
    cfg = load_config(args.config)
    # Training problems come from a task seeded differently from the demo's, so the demo's dev set stays held out.
    train_task = get_task("arithmetic", min_digits=min(digits), max_digits=max(digits), n_train=args.n_per_digit,
                          n_dev=0, n_exemplars=0, seed=args.seed)
    # the demo's held-out questions (iteration_train.py's arithmetic defaults) stay out of pretraining
    eval_task = get_task("arithmetic", min_digits=min(eval_digits), max_digits=max(eval_digits), n_dev=args.n_eval,
                         n_exemplars=0, seed=0)
    dev = eval_task.load("dev")
    hold_out = {d.strip() for d in args.hold_out_digits.split(",") if d.strip()}
    held_out = {ex.question for ex in dev if eval_task.answer_classes(ex) in hold_out}
    rng = random.Random(args.seed)
    pairs = [(train_task.format_question(ex, hint=rng.random() < args.p_hint), train_task.reference_completion(ex))
             for ex in train_task.load("train")
             if int(train_task.answer_classes(ex)) in digits and ex.question not in held_out]
    t0 = time.time()
    train_seconds = None
    with tempfile.TemporaryDirectory() as work:
        if args.eval_only:
            backend = JaxBackend(cfg, None, GenerationSettings(batch_size=100))
            params, _, _, _ = ckpt.load_checkpoint(args.out, cfg, with_opt=False)
        else:
            # the LR anneals over the whole run (the demo config's own schedule is for the short STaR fine-tunes)
            run_cfg = cfg.replace(total_steps=args.steps, anneal_steps=args.steps, ckpt_every=0, lr=args.lr,
                                  end_lr=args.lr / 10, warmup_steps=args.warmup)
            backend = JaxBackend(run_cfg, None, GenerationSettings(batch_size=100))
            index = pack_examples(pairs, backend.tokenizer, cfg.seq, os.path.join(work, "records"), "pretrain",
                                  seed=args.seed)
            state = train(run_cfg.replace(train_set=index),
                          RunOptions(ckpt_path=os.path.join(work, "ckpt"), total_steps=args.steps, seed=args.seed,
                                     desc="pretrain"), trainer=backend.trainer)
            params = jax.tree.map(np.asarray, state.params)
            train_seconds = round(time.time() - t0, 1)
            if os.path.exists(args.out):
                shutil.rmtree(args.out)
            ckpt.save_checkpoint(args.out, params, args.steps, cfg, shards=1)  # saved before the evaluation
        records = run_pass(eval_task, dev, backend.generate_fn(params),
                           PassOptions(gen_length=eval_task.default_gen_length, chunk_size=100, desc="eval base"),
                           os.path.join(work, "eval.jsonl"))
    accuracy = accuracy_by_class(records)
    info = {"command": "python scripts/pretrain_arithmetic_base.py " + " ".join(argv or sys.argv[1:]),
            "args": vars(args), "train_examples": len(pairs), "train_seconds": train_seconds,
            "held_out_accuracy": accuracy}
    info_path = os.path.join(args.out, "pretrain_info.json")
    if args.eval_only and os.path.exists(info_path):
        with open(info_path) as f:
            info = {**json.load(f), "held_out_accuracy": accuracy}
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
