"""Answer a split's questions with a checkpoint and report accuracy; on the train split, also write the STaR
training text of the correct (and rationalized) answers. The standalone form of one STaR generation/eval stage,
with ezelikman/STaR's `device_inference.py` flags.

  python device_inference.py --config run/iter_01.json --split dev --dataset_mode cqa --data-dir ../shared/data/star
  python device_inference.py --config configs/star_qwen2.5_0.5b.json --hf ./Qwen2.5-0.5B --split dev --dataset_mode gsm

The answers file is resumed by a rerun, but only by the same checkpoint (path and step), config and flags: they are
recorded beside it (<out>.identity.json); another checkpoint's answers are refused (--force-new answers anew). One
process writes an answers file at a time (<out>.lock).
"""
import argparse
import json
import logging
import os
import sys


def parse_args(argv=None):
    from mesh_transformer.cli_util import ERRORS_EPILOG, add_compile_cache_flag
    p = argparse.ArgumentParser(description=__doc__, epilog=ERRORS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", required=True, help="JSON config; its checkpoint folder (bucket/model_dir) is loaded")
    a("--direct", action="store_true", help="answer directly, with the direct prompts (no rationale)")
    a("--rationalize", action="store_true", help="retry wrong answers with the hinted prompt")
    a("--no_prompt", action="store_true", help="no few-shot prompt in front of the questions")
    a("--few_shot_train", action="store_true", help="save the few-shot prompt in front of each training example")
    a("--show_hint_prompt", action="store_true", help="(original flag; the hinted prompt is always loaded here)")
    a("--split", default="dev", help="train or dev")
    a("--dataset_mode", default="cqa", help="cqa, gsm or arithmetic (also commonsenseqa, gsm8k)")
    a("--data-dir", default=None, help="folder in the STaR repo layout (commonsenseqa/, gsm/)")
    a("--n_train_samples", type=int, default=3000, help="train split: questions sampled (shuffled with --seed)")
    a("--gen_length", type=int, default=96, help="maximum new tokens per answer")
    a("--eval_batch_size", type=int, default=8, help="questions per generation batch")
    a("--p_show_hint_save", type=float, default=0.0, help="share of rationalized examples saved with the hint")
    a("--p_rationalization", type=float, default=None, help="share of wrong answers to rationalize "
                                                            "(default: the config's p_rationalization, else 1)")
    a("--ckpt_step", type=int, default=-1, help="checkpoint step to load; -1: the latest")
    a("--ckpt", default=None, help="checkpoint folder (default: the config's bucket/model_dir)")
    a("--hf", default=None, help="answer with a Hugging Face folder (config.json + safetensors) of a Llama, Qwen2, "
                                 "Mistral or GPT-J model instead of a checkpoint: the model's keys come from its "
                                 "config.json, every other key (seq, target_save, ...) from --config")
    a("--eval_seq", type=int, default=-1, help="context length for generation; -1: the config's seq")
    a("--out", default=None, help="JSONL of every answer (default: <split>_answers.jsonl beside target_save "
                                  "or in the current folder)")
    a("--seed", type=int, default=0, help="seed of the train sample and of the rationalization coin flips")
    a("--force-new", action="store_true",
      help="the answers file was written by another checkpoint or other settings: delete it and answer anew")
    a("--resume-anyway", action="store_true",
      help="resume the answers file although it was written with other settings (recorded in its identity file)")
    from star.flags import RayOptions, add_flags, ray_options
    add_flags(p, RayOptions)  # --ray-address, --ray-workers, ...: the answers are generated on Ray actors
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    if args.hf and args.ckpt:
        p.error("give --hf or --ckpt, not both")
    try:
        args.ray = ray_options(vars(args), "device_inference.py")
    except ValueError as e:
        p.error(str(e))
    from mesh_transformer import flag_checks as fc
    fc.check(args, {"--n_train_samples": fc.at_least(1), "--gen_length": fc.at_least(1),
                    "--eval_batch_size": fc.at_least(1), "--p_show_hint_save": fc.share(),
                    "--p_rationalization": fc.share(), "--ckpt_step": fc.at_least(0, also=(-1,)),
                    "--eval_seq": fc.at_least(1, also=(-1,))}, "device_inference.py")
    return args


def answers_fields(args, cfg, ckpt_path: str, step: int) -> dict:
    """What defines an answers file: the checkpoint (path and step), the model config and every flag that changes
    the answers."""
    from mesh_transformer import run_identity
    fields = run_identity.config_fields(cfg)
    path = ckpt_path if "://" in ckpt_path else os.path.abspath(ckpt_path)
    flags = {k: getattr(args, k) for k in ("split", "dataset_mode", "data_dir", "direct", "rationalize", "no_prompt",
                                           "few_shot_train", "gen_length", "p_show_hint_save", "p_rationalization",
                                           "seed", "eval_seq")}
    if args.split == "train":
        flags["n_train_samples"] = args.n_train_samples
    return {"checkpoint": {"path": path.rstrip("/"), "step": int(step)},
            "config_hash": run_identity.config_hash(fields), "config": fields, "flags": flags}


def main(argv=None):
    args = parse_args(argv)
    from mesh_transformer.cli_util import setup_compile_cache, setup_logging
    setup_logging()
    args.compile_cache_folder = setup_compile_cache(args.compile_cache)
    from mesh_transformer import run_lock
    from mesh_transformer.cli_util import check_output_dir
    from mesh_transformer.config import load_config

    # the destinations first: nothing is loaded before we know the answers can be written, by this process alone
    if args.hf:
        from mesh_transformer.loading import hf_config
        cfg_for_paths = hf_config(args.hf, args.config)  # reads the folder's config.json only
    else:
        cfg_for_paths = load_config(args.config)
    target_dir = os.path.dirname(cfg_for_paths.target_save) if cfg_for_paths.target_save else "."
    out = args.out or os.path.join(target_dir, f"{args.split}_answers.jsonl")
    out_dir = os.path.dirname(out) or "."
    check_output_dir(out_dir, "--out folder" if args.out else "answers folder")  # the lock below creates it
    if args.split == "train" and cfg_for_paths.target_save:
        check_output_dir(os.path.dirname(cfg_for_paths.target_save) or ".", "config target_save folder")
    with run_lock.acquire(out_dir, owner="device_inference.py", what=f"answers file {out}",
                          name=os.path.basename(out) + ".lock"):
        _answer(args, out, out_dir)


def _answer(args, out: str, out_dir: str) -> None:
    from mesh_transformer import checkpoint as ckpt
    from mesh_transformer.config import load_config
    from star.backend import GenerationSettings, JaxBackend
    from star.tasks import get_task

    aliases = {"cqa": "commonsenseqa", "gsm": "gsm8k"}
    # --seed is the train sample's seed (as in iteration_train.py), not the arithmetic task's data seed; only
    # arithmetic takes a seed, and CQA / GSM8K reject one
    task = get_task(aliases.get(args.dataset_mode, args.dataset_mode), data_dir=args.data_dir)
    if args.hf:
        from mesh_transformer.loading import hf_config
        cfg = hf_config(args.hf, args.config)
    else:
        cfg = load_config(args.config)
    if args.eval_seq > 0:
        cfg = cfg.replace(seq=args.eval_seq)
    ckpt_path = args.hf or args.ckpt or ckpt.checkpoint_dir(cfg)
    gen = GenerationSettings(batch_size=args.eval_batch_size, seed=args.seed)
    step = None if args.ckpt_step < 0 else args.ckpt_step
    if args.ray.ray_workers:  # each Ray worker reads the checkpoint itself; this process never holds it
        from star.ray_generation import RayBackend, shutdown
        backend = RayBackend(cfg, None, gen, args.ray, compile_cache=args.compile_cache_folder)
        try:
            params, loaded_step = (backend.remote_base(args.hf) if args.hf else
                                   backend.remote_checkpoint(ckpt_path, step))
        except BaseException:
            shutdown(backend)
            raise
    elif args.hf:
        backend = JaxBackend(cfg, args.hf, gen)
        params, loaded_step = backend.base_params(), -1
    else:
        backend = JaxBackend(cfg, None, gen)
        params, _, loaded_step, _ = ckpt.load_checkpoint(ckpt_path, cfg, step=step, with_opt=False)
    logging.info("loaded %s step %d", ckpt_path, loaded_step)
    try:
        _answer_with(args, out, out_dir, task, cfg, ckpt_path, backend, params, loaded_step)
    finally:
        if args.ray.ray_workers:
            shutdown(backend)


def _answer_with(args, out, out_dir, task, cfg, ckpt_path, backend, params, loaded_step) -> None:
    from mesh_transformer import run_identity
    from star.rationales import PassOptions, accuracy_by_class, run_pass, summarize, training_text
    # an answers file belongs to one checkpoint and one set of flags: another one's answers are never resumed
    run_identity.check_identity(out_dir, "answers", answers_fields(args, cfg, ckpt_path, loaded_step),
                                what="answers file", force_new=args.force_new, resume_anyway=args.resume_anyway,
                                has_outputs=lambda: os.path.exists(out),
                                clear=lambda: os.path.exists(out) and os.remove(out), adopt_unrecorded=False,
                                name=os.path.basename(out) + ".identity.json", where=out)

    examples = task.load(args.split)
    if args.split == "train":
        import random
        examples = list(examples)
        random.Random(args.seed).shuffle(examples)
        examples = examples[:args.n_train_samples]
    p_rat = args.p_rationalization if args.p_rationalization is not None else (cfg.p_rationalization or 1.0)
    opts = PassOptions(rationalize=args.rationalize and args.split == "train", p_rationalization=p_rat,
                       p_show_hint_save=args.p_show_hint_save, few_shot_train=args.few_shot_train,
                       no_prompt=args.no_prompt, direct=args.direct, gen_length=args.gen_length,
                       chunk_size=args.eval_batch_size * backend.generation_batches, seed=args.seed,
                       desc=args.split)
    records = run_pass(task, examples, backend.generate_fn(params), opts, out)
    if args.split == "train" and cfg.target_save:
        by_id = {ex.id: ex for ex in examples}
        os.makedirs(os.path.dirname(cfg.target_save) or ".", exist_ok=True)
        text = "".join(training_text(task, r, by_id[r["id"]], opts) for r in records if r["keep"])
        tmp = cfg.target_save + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, cfg.target_save)
        logging.info("wrote %s", cfg.target_save)
    print(json.dumps({"split": args.split, "accuracy": accuracy_by_class(records), **summarize(records)}, indent=2))


if __name__ == "__main__":
    from mesh_transformer.cli_util import run_main
    sys.exit(run_main(main))
