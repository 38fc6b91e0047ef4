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
  python iteration_train.py --task gsm8k --data-dir ../shared/data/star --config configs/star_qwen2.5_0.5b.json \\
      --hf ./Qwen2.5-0.5B                                       # a Llama-family base (README: STaR on a modern model)
"""
import argparse
import dataclasses
import json
import logging
import os
import sys

TASK_ALIASES = {"cqa": "commonsenseqa", "gsm": "gsm8k"}
TASKS = ("arithmetic", "commonsenseqa", "gsm8k")


def _presets() -> dict:
    """Each task's defaults, from the task itself (star/tasks/: `loop_preset`)."""
    from star.tasks import get_task
    return {name: get_task(name).loop_preset for name in TASKS}


def parse_args(argv=None):
    from mesh_transformer.cli_util import ERRORS_EPILOG, add_compile_cache_flag
    from star.flags import RAY_FIELDS, RayOptions, add_flags, build, flat, ray_options
    from star.loop import StarOptions

    presets = _presets()
    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # the model and the task's own options; the loop's options come from StarOptions / PassOptions below
    a("--config", default=None, help="model/training JSON config (mtj keys); default per task: "
                                     "configs/star_arithmetic_tiny.json for arithmetic, configs/qa_base.json otherwise")
    a("--tokenizer", default=None, help="override the config's tokenizer: 'byte', 'gpt2' or a folder with vocab.json "
                                        "and merges.txt")
    a("--base_model_location", default=None,
      help="base model: a v1 checkpoint folder (local or gs://), an HF GPT-J folder, or 'random' (default per task: "
           "assets/arithmetic_base for arithmetic, gs://checkpoint-bucket/step_383500/ otherwise)")
    a("--hf", default=None,
      help="base model: a Hugging Face folder (config.json + safetensors) of a Llama, Qwen2, Mistral or GPT-J model. "
           "Its config.json gives the model's keys (family, shapes, rope, dtype), --config every other key (seq, "
           "batch, lr, ...); its tokenizer.json is the tokenizer unless --tokenizer says otherwise. Replaces "
           "--base_model_location; each iteration's fine-tune is then saved as HF folders (iter_NN/ckpt/step_N/)")
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
    add_flags(p, StarOptions, presets)
    add_flags(p, RayOptions)  # --ray-address, --ray-workers, ...: generation on Ray actors (star/ray_generation.py)
    add_compile_cache_flag(p)
    a("--force-new", dest="force_new", action="store_true",
      help="--out-dir holds a run with other settings (run_identity.json): delete its contents and start over")
    a("--resume-anyway", dest="resume_anyway", action="store_true",
      help="continue the --out-dir run with other settings (the difference is recorded in run_identity.json)")
    from mesh_transformer import wandb_log
    wandb_log.add_flags(p)
    args = p.parse_args(argv)
    try:
        ray_opts = ray_options(vars(args), "iteration_train.py")
    except ValueError as e:
        p.error(str(e))
    for key in RAY_FIELDS:  # one object instead (args.ray), kept out of the run identity: the answers are the same
        delattr(args, key)
    args.task = TASK_ALIASES.get(args.task or "arithmetic", args.task or "arithmetic")
    if args.task not in TASKS:
        p.error(f"--task {args.task!r} does not exist; choose one of {', '.join(TASKS)} (or cqa, gsm)")
    preset = dict(presets[args.task])
    if args.exponential_grow and args.steady_grow is None:
        preset["steady_grow"] = False  # an explicit --exponential_grow wins over a task's steady default
    if args.hf:
        if args.base_model_location is not None:
            p.error("give --hf or --base_model_location, not both: --hf is the base model")
        args.base_model_location = args.hf
    for key in ("config", "base_model_location"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.options = build(StarOptions, vars(args), preset)
    opts = args.options
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
        if args.train_digits:
            opts.train_classes = tuple(d.strip() for d in args.train_digits.split(","))
    if opts.replay_file is None and opts.replay_n:  # default: the base's own pretraining data, if it ships them
        from star.loop import PRETRAIN_PAIRS
        pairs = os.path.join(args.base_model_location or "", PRETRAIN_PAIRS)
        if os.path.exists(pairs):
            opts.replay_file = pairs
        else:
            opts.replay_n = 0
    vars(args).update(flat(opts))  # the namespace holds the resolved values too, as every flag's reader expects
    from star.experiment_guard import check_flags
    check_flags(args)  # ranges of the numeric flags, e.g. --p_rationalization in [0, 1]
    args.ray = ray_opts
    return args


def main(argv=None):
    args = parse_args(argv)
    ray_opts = args.ray
    from mesh_transformer.cli_util import setup_compile_cache, setup_logging
    setup_logging()
    compile_cache = setup_compile_cache(args.compile_cache)
    from mesh_transformer.config import load_config
    from star.experiment_guard import open_experiment

    opts = args.options
    if args.hf:  # the model from the folder, the training keys from --config
        from mesh_transformer.loading import hf_config
        cfg = hf_config(args.hf, args.config)
    else:
        cfg = load_config(args.config)
    if args.tokenizer:
        cfg = cfg.replace(tokenizer=args.tokenizer)
    cfg = cfg.replace(gradient_accumulation_steps=opts.gradient_accumulation_steps)
    without_ray = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "ray"})
    with open_experiment(without_ray, cfg):  # the folder's lock and run identity, before anything is written there
        return _run(args, argv, cfg, opts, ray_opts, compile_cache)


def _run(args, argv, cfg, opts, ray_opts, compile_cache):
    from star.backend import GenerationSettings, JaxBackend
    from star.loop import StarRun
    from star.tasks import get_task

    os.makedirs(opts.out_dir, exist_ok=True)
    with open(os.path.join(opts.out_dir, "run_config.json"), "w") as f:
        json.dump({"argv": sys.argv[1:] if argv is None else list(argv), "options": _jsonable(vars(args)),
                   **({"ray": dataclasses.asdict(ray_opts)} if ray_opts.ray_workers else {}),
                   "model_config": cfg.to_dict()}, f, indent=2)
    task_options = {}
    if args.task == "arithmetic":
        task_options = dict(min_digits=args.min_digits, max_digits=args.max_digits, n_exemplars=args.n_exemplars,
                            n_dev=args.n_dev_per_digit)
    task = get_task(args.task, data_dir=opts.data_dir, **task_options)
    gen = GenerationSettings(temperature=opts.temperature, batch_size=opts.eval_batch_size, seed=opts.seed)
    if ray_opts.ray_workers:  # generation on Ray workers; fine-tuning stays here
        from star.ray_generation import RayBackend
        backend = RayBackend(cfg, args.base_model_location, gen, ray_opts, compile_cache=compile_cache,
                             progress=opts.progress, anneal_per_finetune=opts.anneal_each_finetune)
    else:
        backend = JaxBackend(cfg, args.base_model_location, gen, progress=opts.progress,
                             anneal_per_finetune=opts.anneal_each_finetune)
    from mesh_transformer import wandb_log
    wandb_log.configure(args.wandb_project or cfg.wandb_project, args.wandb_mode, args.wandb_dir,
                        f"star_{args.task}_{os.path.basename(os.path.normpath(opts.out_dir))}", _jsonable(vars(args)))
    run = StarRun(opts, task, backend)
    if wandb_log.enabled():  # after configure
        run.on_row = wandb_log.log_iteration
    def generation_shape() -> dict:  # a generation batch: the few-shot prefix, the longest of 200 questions
        tok, g = backend.tokenizer, opts.generation
        return dict(batch=opts.eval_batch_size, new_tokens=g.gen_length,
                    prefix=len(tok.encode(task.few_shot_prompt(hint=False, direct=g.direct))),
                    prompt=max([len(tok.encode(task.format_question(ex, hint=g.rationalize)))
                                for ex in run.train_examples[:200]] or [1]))

    if not opts.dry_run:
        backend.check_memory(generation_shape)
    try:
        rows = run.run()
        wandb_log.log_files([os.path.join(opts.out_dir, f) for f in ("results.md", "accuracy.png", "results.json")])
    finally:
        wandb_log.finish()
        if ray_opts.ray_workers:
            from star.ray_generation import shutdown
            shutdown(backend)
    report = os.path.join(opts.out_dir, "results.md")
    if opts.dry_run or not os.path.exists(report):
        logging.getLogger("star").info("done: %d iterations (no report: nothing was run)", len(rows))
        return
    logging.getLogger("star").info("done: %d iterations; see %s", len(rows), report)
    with open(report) as f:
        print(f.read())


def _jsonable(options: dict) -> dict:
    """The flags (resolved: given, else the task's preset, else the default) as plain JSON."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if k not in ("options", "ray")}


if __name__ == "__main__":
    from mesh_transformer.cli_util import run_main
    sys.exit(run_main(main))
