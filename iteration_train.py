"""STaR: the outer loop of ezelikman/STaR's `iteration_train.py`, in one process.

With no arguments it runs the demo: STaR with rationalization on 1-3 digit addition (Nye et al. scratchpads), a tiny
GPT-J and the byte tokenizer, on the CPU, no downloads, starting from the small base model shipped in
assets/arithmetic_base (made by `bash scripts/make_arithmetic_base.sh`). Each iteration: generate rationales with
M(n-1), keep the correct ones, rationalize the wrong ones with the answer as a hint, pack the kept ones to TFRecords
(loss on the completion only), fine-tune for steps(n), evaluate on held-out questions. As the original, every
fine-tune starts from the BASE model; the demo instead continues the previous iteration's model, replays 300
examples of the base's pretraining data and anneals the learning rate within each fine-tune (--finetune_from
previous, --replay_n 300, --anneal_each_finetune), and asks training questions of 2-3 digits only (--train_digits;
docs/DEVIATIONS.md says why).

The experiment folder (--out-dir) gets results.md, accuracy.png and per iteration the rationale JSONL, training text,
TFRecords, checkpoint and metrics. Killed at any stage, the same command continues where it stopped.

  python iteration_train.py                                    # the CPU demo
  python iteration_train.py --task commonsenseqa --data-dir ../shared/data/star --config configs/qa_base.json \\
      --base_model_location gs://checkpoint-bucket/step_383500/ --rationalize --exponential_grow --max-steps 7912
"""
import argparse
import logging
import os
import sys

REPO = os.path.dirname(os.path.abspath(__file__))

# Per-task defaults for flags the user does not give. commonsenseqa / gsm8k keep the original script's defaults;
# arithmetic is the CPU demo.
TASK_DEFAULTS = {
    "arithmetic": dict(config=os.path.join(REPO, "configs", "star_arithmetic_tiny.json"),
                       base_model_location=os.path.join(REPO, "assets", "arithmetic_base"),
                       out_dir="runs/star_arithmetic", rationalize=True, n_iters=5, n_train_samples=900,
                       gen_length=120, gradient_accumulation_steps=1, steady_grow=False,
                       start_steps=60, add_steps=20, eval_batch_size=100,
                       # epoch mode: steps = kept * epochs / 40 (40 ~ examples per step of the demo config)
                       base_epochs=3.0, add_epochs=0.5, sequence_count=40, p_show_hint_save=0.3,
                       # the tiny model keeps what it learned: each fine-tune continues the previous iteration's model
                       # and replays 300 examples of the base's pretraining data (BASE/pretrain_pairs.jsonl, when the
                       # base has one), so it does not forget what it knew
                       finetune_from="previous", replay_n=300,
                       # each fine-tune's learning rate decays to end_lr over its own steps: the tiny model ends
                       # each iteration on small steps instead of at the peak rate (docs/RESULTS.md, loop settings)
                       anneal_each_finetune=True),
    "commonsenseqa": dict(config=os.path.join(REPO, "configs", "qa_base.json"),
                          base_model_location="gs://checkpoint-bucket/step_383500/", out_dir="runs/star_commonsenseqa",
                          rationalize=False, n_iters=64, n_train_samples=10000, gen_length=96,
                          gradient_accumulation_steps=8, start_steps=40, add_steps=20, eval_batch_size=8,
                          base_epochs=1.0, add_epochs=0.2, sequence_count=10, p_show_hint_save=0.0,
                          finetune_from="base", replay_n=0, anneal_each_finetune=False),
    "gsm8k": dict(config=os.path.join(REPO, "configs", "qa_base.json"),
                  base_model_location="gs://checkpoint-bucket/step_383500/", out_dir="runs/star_gsm8k",
                  rationalize=False, n_iters=64, n_train_samples=10000, gen_length=256,
                  gradient_accumulation_steps=8, start_steps=40, add_steps=20, eval_batch_size=8,
                  base_epochs=1.0, add_epochs=0.2, sequence_count=10, p_show_hint_save=0.0,
                  finetune_from="base", replay_n=0, anneal_each_finetune=False),
}
TASK_ALIASES = {"cqa": "commonsenseqa", "gsm": "gsm8k"}


def parse_args(argv=None):
    from mesh_transformer.cli_util import ERRORS_EPILOG
    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", default="arithmetic",
      help="arithmetic (default: the CPU demo), commonsenseqa (cqa) or gsm8k (gsm)")
    a("--config", default=None, help="model/training JSON config (mtj keys); default per task, e.g. "
                                     "configs/star_arithmetic_tiny.json for arithmetic, configs/qa_base.json otherwise")
    a("--data-dir", "--data_dir", dest="data_dir", default=None,
      help="folder in the STaR repo layout (commonsenseqa/..., gsm/...) for the real tasks, e.g. ../shared/data/star; "
           "not needed for arithmetic")
    a("--out-dir", "--out_dir", dest="out_dir", default=None, help="experiment folder (default runs/star_<task>)")
    a("--tokenizer", default=None, help="override the config's tokenizer: 'byte', 'gpt2' or a folder with vocab.json "
                                        "and merges.txt")
    a("--base_model_location", default=None,
      help="base model: a v1 checkpoint folder (local or gs://), an HF GPT-J folder, or 'random'")
    a("--rationalize", action=argparse.BooleanOptionalAction, default=None,
      help="retry wrong answers with the answer as a hint (default: on for arithmetic, off otherwise, as the original)")
    a("--p_rationalization", type=float, default=1.0, help="share of wrong examples to rationalize")
    a("--p_show_hint_save", type=float, default=None,
      help="share of rationalized examples saved WITH the hint (default 0, as the original; 0.3 for the demo, whose "
           "tiny model otherwise unlearns using hints after one iteration)")
    a("--few_shot_train", action="store_true", help="save the few-shot prompt in front of each training example")
    a("--no_prompt", action="store_true", help="after iteration 1, generate without the few-shot prompt")
    a("--direct", action="store_true", help="answer directly, without rationales (the direct baseline)")
    a("--n_iters", type=int, default=None, help="number of outer-loop iterations")
    a("--start_iter", type=int, default=1, help="first iteration to run (earlier ones must exist in --out-dir)")
    a("--n_train_samples", type=int, default=None, help="training questions sampled per iteration")
    a("--n_dev_samples", type=int, default=None, help="evaluate on the first N dev questions only (default: all)")
    a("--gen_length", type=int, default=None, help="maximum new tokens per rationale")
    a("--gradient_accumulation_steps", type=int, default=None, help="micro-batches per optimizer step")
    a("--exponential_grow", action="store_true", help="steps(n) = start_steps * grow_steps**(n-1) (the paper's)")
    a("--steady_grow", action=argparse.BooleanOptionalAction, default=None,
      help="steps(n) = start_steps + add_steps*(n-1)")
    a("--start_steps", type=float, default=None, help="steps of the first iteration (grow modes)")
    a("--add_steps", type=float, default=None, help="steps added per iteration (steady mode)")
    a("--grow_steps", type=float, default=1.2, help="growth factor per iteration (exponential mode)")
    a("--base_epochs", type=float, default=None, help="epochs of the first iteration (epoch mode, the default "
                                                       "when neither grow flag is set; default 1, the demo 3)")
    a("--add_epochs", type=float, default=None, help="epochs added per iteration (epoch mode; default 0.2, demo 0.5)")
    a("--sequence_count", type=int, default=None,
      help="examples per optimizer step on average (epoch mode: steps = kept * epochs / (GA * this); default 10, "
           "the demo 40)")
    a("--finetune_from", choices=("base", "previous"), default=None,
      help="start each iteration's fine-tune from the base model (the original; the default except for the demo) "
           "or from the previous iteration's model (the demo: its tiny model learns too little per iteration from "
           "the base)")
    a("--carry_optimizer", action=argparse.BooleanOptionalAction, default=None,
      help="with --finetune_from previous: each fine-tune also continues the previous iteration's Adam moments "
           "(read from its checkpoint; the learning-rate schedule and warm-up restart) instead of a fresh optimizer "
           "(default off)")
    a("--replay_file", default=None,
      help="JSONL of {\"context\", \"completion\"} examples mixed into every fine-tune (see --replay_n); "
           "default: pretrain_pairs.jsonl in the base model's folder, when --replay_n > 0 and the base has one "
           "(the demo's does)")
    a("--replay_n", type=int, default=None,
      help="examples drawn from --replay_file per iteration, with replacement (default 0; the demo 300, or 0 when its "
           "base has no pretrain_pairs.jsonl); they are trained on but add no steps and are not counted as kept")
    a("--anneal_each_finetune", action=argparse.BooleanOptionalAction, default=None,
      help="each fine-tune's learning rate decays (cosine) to the config's end_lr over its own steps, instead of "
           "following the config's anneal_steps (the original: anneal_steps 300000, so the rate stays near its peak). "
           "Default: on for the arithmetic demo, off otherwise")
    a("--copy_n", type=int, default=0, help="also train on the last N examples of the previous iteration")
    a("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
      help="cap on steps per iteration (the paper capped GSM8K at 7912)")
    a("--eval_batch_size", type=int, default=None, help="questions per generation batch")
    a("--temperature", type=float, default=0.0, help="sampling temperature of all generation (0 = greedy, as the paper)")
    a("--n_samples", type=int, default=1,
      help="rationales sampled per training question (with --temperature > 0); distinct correct ones are all kept")
    a("--verify_rationales", action="store_true",
      help="drop kept rationales whose checkable steps are wrong (arithmetic lines, GSM8K <<a*b=c>> annotations)")
    a("--min_digits", type=int, default=1, help="arithmetic: smallest digit count of the sums")
    a("--max_digits", type=int, default=3, help="arithmetic: largest digit count (the paper used 1-5)")
    a("--n_exemplars", type=int, default=0,
      help="arithmetic: few-shot exemplars in the prompt (0 for the demo: its base model learned the format)")
    a("--n_dev_per_digit", type=int, default=100, help="arithmetic: held-out questions per digit count")
    a("--train_digits", default=None,
      help="arithmetic: comma-separated digit counts the training questions are drawn from, or 'all'. Default: 2 up "
           "to --max_digits when --min_digits is 1 (the demo). Every 1-digit sum is in the base's pretraining data "
           "(only 81 exist, 41 of them training questions): asking those 41 again, ~7 times each per iteration, "
           "taught nothing and made the 40 held-out ones drift (docs/RESULTS.md, loop settings). 1-digit sums stay "
           "in dev, as the check that nothing is forgotten")
    a("--gold", action="store_true",
      help="baseline: fine-tune on the gold completions of the sampled questions (gold scratchpads, or answers only "
           "with --direct) instead of on the model's rationales")
    a("--seed", type=int, default=0, help="seed of the question sampling and of the rationalization coin flips")
    a("--dry_run", action="store_true", help="print the plan, run nothing")
    a("--skip_eval", action="store_true", help="do not evaluate on dev")
    a("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    a("--force-new", dest="force_new", action="store_true",
      help="--out-dir holds a run with other settings (run_identity.json): delete its contents and start over")
    a("--resume-anyway", dest="resume_anyway", action="store_true",
      help="continue the --out-dir run with other settings (the difference is recorded in run_identity.json)")
    args = p.parse_args(argv)
    args.task = TASK_ALIASES.get(args.task, args.task)
    if args.task not in TASK_DEFAULTS:
        p.error(f"--task {args.task!r} does not exist; choose one of {', '.join(TASK_DEFAULTS)} (or cqa, gsm)")
    if args.exponential_grow and args.steady_grow is None:
        args.steady_grow = False  # an explicit --exponential_grow wins over a task's steady default
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.task == "arithmetic":
        digit_counts = [str(k) for k in range(args.min_digits, args.max_digits + 1)]
        if args.train_digits is None and args.min_digits == 1:  # 1..max -> 2..max (1 alone: all)
            args.train_digits = ",".join(digit_counts[1:]) or "all"
        if args.train_digits == "all":
            args.train_digits = None
        elif args.train_digits:
            unknown = [d.strip() for d in args.train_digits.split(",") if d.strip() not in digit_counts]
            if unknown:
                p.error(f"--train_digits {args.train_digits!r}: {', '.join(unknown)} is not a digit count of this "
                        f"task ({args.min_digits}..{args.max_digits}); give some of {','.join(digit_counts)} or 'all'")
    from star.experiment_guard import check_flags
    check_flags(args)  # ranges of the numeric flags, e.g. --p_rationalization in [0, 1]
    if args.replay_file is None and args.replay_n:  # default: the base's own pretraining data, if it ships them
        from star.loop import PRETRAIN_PAIRS
        pairs = os.path.join(args.base_model_location or "", PRETRAIN_PAIRS)
        if os.path.exists(pairs):
            args.replay_file = pairs
        else:
            args.replay_n = 0
    return args


def main(argv=None):
    args = parse_args(argv)
    from mesh_transformer.cli_util import setup_logging
    setup_logging()
    from mesh_transformer.config import load_config
    from star.loop import StarOptions

    cfg = load_config(args.config)
    if args.tokenizer:
        cfg = cfg.replace(tokenizer=args.tokenizer)
    cfg = cfg.replace(gradient_accumulation_steps=args.gradient_accumulation_steps)
    fields = {f for f in StarOptions.__dataclass_fields__}
    opts = StarOptions(**{k: v for k, v in vars(args).items() if k in fields})
    if args.train_digits:
        opts.train_classes = tuple(d.strip() for d in args.train_digits.split(","))
    from star.experiment_guard import open_experiment
    with open_experiment(args, cfg):  # the folder's lock and run identity; writes run_config.json
        return _run(args, cfg, opts)


def _run(args, cfg, opts):
    from star.backend import GenerationSettings, JaxBackend
    from star.loop import StarRun
    from star.tasks import get_task

    task_options = {}
    if args.task == "arithmetic":
        task_options = dict(min_digits=args.min_digits, max_digits=args.max_digits, n_exemplars=args.n_exemplars,
                            n_dev=args.n_dev_per_digit)
    task = get_task(args.task, data_dir=args.data_dir, **task_options)
    backend = JaxBackend(cfg, args.base_model_location,
                         GenerationSettings(temperature=args.temperature, batch_size=args.eval_batch_size,
                                            seed=args.seed), progress=args.progress,
                         anneal_per_finetune=bool(args.anneal_each_finetune))
    rows = StarRun(opts, task, backend).run()
    report = os.path.join(opts.out_dir, "results.md")
    if args.dry_run or not os.path.exists(report):
        logging.getLogger("star").info("done: %d iterations (no report: nothing was run)", len(rows))
        return
    logging.getLogger("star").info("done: %d iterations; see %s", len(rows), report)
    with open(report) as f:
        print(f.read())


if __name__ == "__main__":
    from mesh_transformer.cli_util import run_main
    sys.exit(run_main(main))
