"""The model side of the STaR loop: load the base, sample rationales, pack text to TFRecords, fine-tune.

`StarRun` (star/loop.py) only calls these five methods, so the loop itself stays free of JAX and file formats.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from typing import List, Optional, Sequence

import jax
import numpy as np

from mesh_transformer import checkpoint as ckpt
from mesh_transformer.config import Config
from mesh_transformer.finetune import RunOptions, train
from mesh_transformer.tokenizer import get_tokenizer
from mesh_transformer.train import Trainer

log = logging.getLogger("star")


def load_base_params(cfg: Config, location: str):
    """Base params (host arrays) from a v1 checkpoint folder or an HF GPT-J folder; JaxBackend.base_params places
    them on the mesh leaf by leaf (and makes a random base there when no location is given)."""
    if os.path.exists(os.path.join(location, "config.json")) and not os.path.exists(os.path.join(location, "meta.json")):
        from mesh_transformer.hf import load_hf
        hf_cfg, params = load_hf(location)  # GPT-J or a Llama-family folder
        for key in ("model_type", "layers", "d_model", "n_heads", "kv_heads", "n_vocab"):
            if getattr(hf_cfg, key) != getattr(cfg, key):
                raise ValueError(f"HF model at {location} has {key}={getattr(hf_cfg, key)} but the config says "
                                 f"{getattr(cfg, key)}; make the config match the model")
        return params
    params, _, _, _ = ckpt.load_checkpoint(location, cfg, with_opt=False)
    return params


def pack_examples(pairs: Sequence[tuple], tokenizer, seq: int, out_dir: str, name: str, seed: int = 10,
                  learn_context: bool = False) -> str:
    """Tokenizes (context, completion) pairs as [BOS] + context + completion + EOS (BOS when the tokenizer has one,
    as the sampler's prompts start with it), with a loss mask of 1 on the completion and EOS only, packs them into
    seq+1 rows and writes `{name}_{n}.tfrecords` + `{name}.index`.

    The mask comes from the known context/completion boundary. The generic rule of create_finetune_tfrecords.py
    (learn what follows the last ':') would mask nearly all of an arithmetic scratchpad, whose lines hold `C: 1`.
    Too little text for one row is repeated until it fills one (logged); the trailing partial row is dropped.
    """
    from tfrecord_utils.build import pack
    from tfrecord_utils.records import TFRecordWriter, token_example, write_index

    docs, masks = [], []
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    for context, completion in pairs:
        ctx, comp = bos + tokenizer.encode(context), tokenizer.encode(completion)  # as the prompts start (sampler)
        docs.append(np.asarray(ctx + comp + [tokenizer.eos_token_id], np.int32))
        masks.append(np.asarray([int(learn_context)] * len(ctx) + [1] * (len(comp) + 1), np.int32))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    docs, masks = [docs[i] for i in order], [masks[i] for i in order]
    total = sum(len(d) for d in docs)
    if 0 < total < seq + 1:
        reps = (seq + 1) // total + 1
        log.warning("only %d tokens of training text (< seq+1 = %d): repeating the examples %d times", total,
                    seq + 1, reps)
        docs, masks = docs * reps, masks * reps
    rows, row_masks, trailing, _ = pack(docs, masks, seq)
    if len(rows) == 0:
        raise ValueError(f"no training examples to pack into {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    record_name = f"{name}_{len(rows)}.tfrecords"
    with TFRecordWriter(os.path.join(out_dir, record_name)) as writer:
        for row, row_mask in zip(rows, row_masks):
            writer.write(token_example(row, row_mask))
    write_index(os.path.join(out_dir, f"{name}.index"), [record_name])
    log.info("packed %d examples (%d tokens) into %d rows of %d; %d trailing tokens dropped", len(pairs), total,
             len(rows), seq + 1, len(trailing))
    return os.path.join(out_dir, f"{name}.index")


@dataclasses.dataclass
class GenerationSettings:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64
    seed: int = 0


class JaxBackend:
    """One trainer and one sampler for the whole run, each compiled once per shape; params stay on the devices
    between generation, fine-tuning and evaluation (at 6B a host round trip is 24 GB per direction)."""

    # batches of gen.batch_size one generate call takes (star/ray_generation.py's RayBackend: one per worker)
    generation_batches = 1

    def __init__(self, cfg: Config, base_location: Optional[str], gen: GenerationSettings = GenerationSettings(),
                 progress: bool = True, anneal_per_finetune: bool = False):
        """anneal_per_finetune: each fine-tune's learning rate decays to the config's end_lr over that fine-tune's
        own steps (anneal_steps = steps - warmup_steps), instead of following the config's anneal_steps."""
        self.cfg = cfg
        self.anneal_per_finetune = anneal_per_finetune
        self.tokenizer = get_tokenizer(cfg.tokenizer)
        self.trainer = Trainer(cfg)
        self.base_location = base_location
        self.gen = gen
        self.progress = progress
        self._base = None
        self._sampler = None
        self._sampler_params = None  # the params object the sampler holds a compute copy of

    def base_params(self):
        """The base model on the devices (loaded once, sharded leaf by leaf)."""
        if self._base is None and (not self.base_location or self.base_location == "random"):
            log.warning("no base model given: starting from a RANDOM init (pass --base_model_location)")
            self._base = self.trainer.init_params(jax.random.PRNGKey(0))
        if self._base is None:
            self._base = self.trainer.put_params(load_base_params(self.cfg, self.base_location))
        return self._base

    def load_params(self, ckpt_dir: str, step: Optional[int] = None):
        params, _, _, _ = ckpt.load_checkpoint(ckpt_dir, self.cfg, step=step, with_opt=False)
        return self.trainer.put_params(params)

    def check_memory(self, generation_shape) -> None:
        """Stops before the run when a fine-tune step or a generation batch would not fit the devices (checked only
        where the devices' memory is known: accelerators, or STAR_DEVICE_MEMORY_GB). generation_shape() -> {batch,
        prefix, prompt, new_tokens}, asked only then."""
        from mesh_transformer.memory import check_before_run
        check_before_run(self.trainer, self._the_sampler(), generation_shape, log=log)

    def _the_sampler(self):
        from mesh_transformer.sampling import Sampler
        if self._sampler is None:
            self._sampler = Sampler(self.trainer.model, mesh=self.trainer.mesh)
        return self._sampler

    def sampler(self, params):
        """The run's one Sampler, running `params` (cast to the compute dtype only when they change)."""
        if self._sampler_params is not params:
            self._the_sampler().set_params(params)
            self._sampler_params = params
        return self._sampler

    def generate_fn(self, params):
        from mesh_transformer.sampling import split_shared_prefix

        gen, tok, seq = self.gen, self.tokenizer, self.cfg.seq
        sampler = self.sampler(params)

        def generate(prompts: Sequence[str], shared_prefix: str, max_new_tokens: int, stop: Sequence[str]) -> List[str]:
            texts = [shared_prefix + p for p in prompts]
            prefix, rows = split_shared_prefix(tok, texts, shared_prefix or None)  # each text tokenized once
            n_prefix = len(prefix or ())
            kwargs = dict(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, stop=tuple(stop),
                          seed=gen.seed, batch_size=gen.batch_size)
            # The original cut a context longer than seq to its last seq tokens; rows that need it lose the
            # shared prefix and are run on their own.
            too_long = [i for i, r in enumerate(rows) if n_prefix + len(r) > seq]
            skip = set(too_long)
            fits = [i for i in range(len(texts)) if i not in skip]
            out = [None] * len(texts)
            if fits:
                done = sampler.complete([rows[i] for i in fits], tok, max_new_tokens, prefix=prefix, **kwargs)
                for i, c in zip(fits, done):
                    out[i] = c
            if too_long:
                log.warning("%d prompt(s) longer than seq=%d tokens: truncated from the left, as the original",
                            len(too_long), seq)
                cut = [(list(prefix or ()) + rows[i])[-seq:] for i in too_long]
                for i, c in zip(too_long, sampler.complete(cut, tok, max_new_tokens, **kwargs)):
                    out[i] = c
            return out
        return generate

    def pack(self, pairs_path: str, out_dir: str) -> str:
        """train.jsonl ({context, completion} per line) -> TFRecords; returns the index (reused when present)."""
        index = os.path.join(out_dir, "train.index")
        if not os.path.exists(index):
            with open(pairs_path) as f:
                pairs = [(r["context"], r["completion"]) for r in map(json.loads, filter(str.strip, f))]
            pack_examples(pairs, self.tokenizer, self.cfg.seq, out_dir, "train",
                          learn_context=self.cfg.loss_mask == "none")
        return index

    def finetune(self, base_params, index_path: str, steps: int, ckpt_dir: str, desc: str = "train", on_step=None,
                 init_ckpt: Optional[str] = None):
        """Fine-tunes base_params (device arrays, left intact) for `steps` steps, checkpointing to ckpt_dir (resumes
        from it when it holds one); on_step(step, metrics) is called after every step. init_ckpt: start from this
        checkpoint's params AND Adam state instead (the learning-rate schedule restarts, as mtj's
        --tune-model-path). Returns the fine-tuned params on the devices."""
        cfg = self.cfg.replace(train_set=index_path, total_steps=steps, val_set={})
        anneal = max(1, steps - cfg.warmup_steps) if self.anneal_per_finetune else None
        if self._sampler is not None:  # its compute copy is not needed while the same devices train
            self._sampler.clear_params()
            self._sampler_params = None
        state = train(cfg, RunOptions(init_params=base_params, tune_model_path=init_ckpt, ckpt_path=ckpt_dir,
                                      total_steps=steps, progress=self.progress, desc=desc, anneal_steps=anneal),
                      trainer=self.trainer, on_step=on_step)
        return state.params
