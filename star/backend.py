"""The model side of the STaR loop: load the base, sample rationales, pack text to TFRecords, fine-tune.

`StarRun` (star/loop.py) only calls these five methods, so the loop itself stays free of JAX and file formats.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, List, Optional, Sequence

import jax
import numpy as np

from mesh_transformer import checkpoint as ckpt
from mesh_transformer.config import Config
from mesh_transformer.finetune import RunOptions, train
from mesh_transformer.tokenizer import get_tokenizer
from mesh_transformer.train import Trainer

log = logging.getLogger("star")


def load_base_params(cfg: Config, location: Optional[str], seed: int = 0):
    """Base params from a v1 checkpoint folder, an HF GPT-J folder, or (None / "random") a random init."""
    if not location or location == "random":
        log.warning("no base model given: starting from a RANDOM init (pass --base_model_location)")
        from mesh_transformer.model import CausalTransformer
        return jax.tree.map(np.asarray, jax.jit(CausalTransformer(cfg).init)(jax.random.PRNGKey(seed)))
    if os.path.exists(os.path.join(location, "config.json")) and not os.path.exists(os.path.join(location, "meta.json")):
        from mesh_transformer.hf import load_hf_gptj
        hf_cfg, params = load_hf_gptj(location)
        for key in ("layers", "d_model", "n_heads", "n_vocab"):
            if getattr(hf_cfg, key) != getattr(cfg, key):
                raise ValueError(f"HF model at {location} has {key}={getattr(hf_cfg, key)} but the config says "
                                 f"{getattr(cfg, key)}; make the config match the model")
        return params
    params, _, _, _ = ckpt.load_checkpoint(location, cfg, with_opt=False)
    return params


@dataclasses.dataclass
class GenerationSettings:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64
    seed: int = 0


class JaxBackend:
    def __init__(self, cfg: Config, base_location: Optional[str], gen: GenerationSettings = GenerationSettings(),
                 progress: bool = True):
        self.cfg = cfg
        self.tokenizer = get_tokenizer(cfg.tokenizer)
        self.trainer = Trainer(cfg)
        self.base_location = base_location
        self.gen = gen
        self.progress = progress
        self._base = None

    def base_params(self):
        if self._base is None:
            self._base = load_base_params(self.cfg, self.base_location)
        return self._base

    def load_params(self, ckpt_dir: str):
        params, _, _, _ = ckpt.load_checkpoint(ckpt_dir, self.cfg, with_opt=False)
        return params

    def generate_fn(self, params):
        from mesh_transformer.sampling import Sampler

        sampler = Sampler(self.trainer.model, params, mesh=self.trainer.mesh)
        gen = self.gen

        def generate(prompts: Sequence[str], shared_prefix: str, max_new_tokens: int, stop: Sequence[str]) -> List[str]:
            return sampler.generate(list(prompts), self.tokenizer, max_new_tokens=max_new_tokens,
                                    temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                                    stop=tuple(stop), seed=gen.seed, shared_prefix=shared_prefix or None,
                                    batch_size=gen.batch_size, max_len=self.cfg.seq)
        return generate

    def pack(self, text_path: str, out_dir: str) -> str:
        """train.txt -> TFRecords with the completion loss mask; returns the index path (reused when present)."""
        from tfrecord_utils.build import build_tfrecords

        index = os.path.join(out_dir, "train.index")
        if os.path.exists(index):
            return index
        with open(text_path) as f:
            text = f.read()
        n_tokens = len(self.tokenizer.encode(text))
        src = text_path
        if n_tokens < self.cfg.seq + 1:  # too little text for one sequence: repeat it (logged)
            reps = (self.cfg.seq + 1) // max(n_tokens, 1) + 1
            log.warning("only %d tokens of training text (< seq+1 = %d): repeating it %d times", n_tokens,
                        self.cfg.seq + 1, reps)
            src = text_path + ".repeated.txt"
            with open(src, "w") as f:
                f.write(text * reps)
        build_tfrecords(src, "train", out_dir, seq_len=self.cfg.seq, tokenizer=self.tokenizer,
                        loss_mask="completion" if self.cfg.loss_mask != "none" else "none", seed=10)
        return index

    def finetune(self, base_params, index_path: str, steps: int, ckpt_dir: str, desc: str = "train"):
        cfg = self.cfg.replace(train_set=index_path, total_steps=steps, val_set={})
        state = train(cfg, RunOptions(init_params=base_params, ckpt_path=ckpt_dir, total_steps=steps,
                                      progress=self.progress, desc=desc), trainer=self.trainer)
        return jax.tree.map(np.asarray, state.params)
