"""Our GPT-J as an EleutherAI lm-evaluation-harness 0.4 model, the successor of mesh-transformer-jax's
`eval_harness.py` (which wrapped `CausalTransformer` in lm-eval 0.0.1's `LM` with a fixed batch of padded rows).

`MeshTransformerLM` is an `lm_eval.api.model.TemplateLM` (an `LM` that owns the context/continuation split), so
requests are tokenized exactly as lm-eval's own `hf` model (HFLM) does; the scoring follows HFLM too:

  * loglikelihood: the input is `(context + continuation)[-(seq + 1):][:-1]`, the continuation's log-probs are read at
    its last len(continuation) positions, `is_greedy` = every continuation token is the argmax. Requests are sorted
    by length (longest first) and run in batches of `batch_size` rows, right-padded to a bucket length
    (`sampling.bucket_length`), rows over 'dp' and the model over 'mp' of the Sampler's mesh; only the [B, T]
    log-probs of the targets leave the device, never the [B, T, V] logits.
  * loglikelihood_rolling: lm-eval's own rolling windows (`get_rolling_token_windows` + `make_disjoint_window`, one
    EOS before the document, windows of `seq` tokens, context 1), summed per document, as HFLM.
  * generate_until: the `Sampler` (KV cache, while_loop decode) with the request's `until` strings (and EOS) as its
    stop strings, `max_gen_toks` (default 256) new tokens, greedy unless the task asks for `do_sample`/temperature;
    the context is left-truncated to seq - max_gen_toks tokens, as HFLM.

Shape glossary: B rows per batch (batch_size rounded up to the dp size), T padded tokens, V vocabulary.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from .sampling import Sampler, bucket_length, decode_completion
from .sharding import DP


def _score_impl(model, params, tokens, targets):
    """log p(targets) [B, T] and whether each target is the argmax [B, T], for right-padded tokens [B, T]."""
    logits = model.forward(params, tokens)[0]  # [B, T, V] float32
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    greedy = jnp.argmax(logits, axis=-1) == targets  # [B, T]
    return target_logit - log_z, greedy


@register_model("mesh_transformer", "mtj")
class MeshTransformerLM(TemplateLM):
    """lm-eval model over a `Sampler` (model, params on a ('dp','mp') mesh) and one of our tokenizers.

    Built by eval_harness.py; or, once this module is imported, by name through lm-eval's registry:
    `lm_eval.simple_evaluate(model="mesh_transformer", model_args="hf=/path/gptj,batch_size=8", ...)` (keys: the
    flags of mesh_transformer.loading.add_model_flags, batch_size, max_gen_toks, max_length)."""

    def __init__(self, sampler: Sampler, tokenizer: Any, batch_size: int = 8, max_gen_toks: int = 256,
                 max_length: Optional[int] = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.tokenizer_ = tokenizer
        self.dp = sampler.dp
        self._batch = -(-int(batch_size) // self.dp) * self.dp  # rows are split over dp
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length or sampler.config.seq)
        rows = NamedSharding(sampler.mesh, P(DP, None))
        self._rows = rows
        self._score = jax.jit(functools.partial(_score_impl, sampler.model), in_shardings=(None, rows, rows),
                              out_shardings=(rows, rows))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """For lm-eval's CLI: `hf=...,config=...,ckpt=...,tokenizer=...,batch_size=...`."""
        import argparse

        from .loading import sampler_from_args

        args = lm_utils.simple_parse_args_string(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"})
        ns = argparse.Namespace(config=None, ckpt=None, ckpt_step=None, hf=None, tokenizer=None,
                                cores_per_replica=None, compute_dtype=None, seed=0)
        opts = {}
        for k, v in args.items():
            if k in ("batch_size", "max_gen_toks", "max_length"):
                opts[k] = int(v)
            elif hasattr(ns, k):
                setattr(ns, k, v)
            else:
                raise ValueError(f"unknown model_args key {k!r} for mesh_transformer; use config, ckpt, ckpt_step, "
                                 f"hf, tokenizer, cores_per_replica, compute_dtype, batch_size, max_gen_toks")
        sampler, tokenizer = sampler_from_args(ns, what="evaluating")
        return cls(sampler, tokenizer, **opts)

    # ----------------------------------------------------------------- what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer_, "name", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return list(self.tokenizer_.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer_.decode(tokens)

    # ----------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log p, is_greedy)."""
        n = self.max_length
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("an lm-eval request has an empty continuation; nothing to score")
            whole = (list(ctx) + list(cont))[-(n + 1):]
            rows.append((whole[:-1], whole[1:], len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first, as HFLM
        out: list = [None] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="loglikelihood requests")
        for lo in range(0, len(order), self._batch):
            idx = order[lo:lo + self._batch]
            t = bucket_length(len(rows[idx[0]][0]))
            toks = np.zeros((self._batch, t), np.int32)
            tgts = np.zeros((self._batch, t), np.int32)
            for r, i in enumerate(idx):
                inp, tgt, _ = rows[i]
                toks[r, :len(inp)] = inp
                tgts[r, :len(tgt)] = tgt
            logp, greedy = jax.device_get(self._score(self.sampler.params, jax.device_put(toks, self._rows),
                                                      jax.device_put(tgts, self._rows)))
            for r, i in enumerate(idx):
                inp, _, m = rows[i]
                sl = slice(len(inp) - m, len(inp))
                out[i] = (float(np.sum(logp[r, sl], dtype=np.float64)), bool(np.all(greedy[r, sl])))
            bar.update(len(idx))
        bar.close()
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        eos = self.tokenizer_.decode([self.eot_token_id])
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in seq {self.max_length}")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] or [self.eot_token_id]
                        for i in idx]
            res = self.sampler.sample(contexts, max_new, temperature=temperature,
                                      top_k=int(kwargs.get("top_k", 0) or 0),
                                      top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=int(kwargs.get("seed", 0)),
                                      eos_id=self.eot_token_id, batch_size=self._batch,
                                      **self.sampler.stop_arguments(self.tokenizer_, until))
            for r, i in enumerate(idx):
                text = decode_completion(self.tokenizer_, res.tokens[r], int(res.lengths[r]), until)
                out[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            bar.update(len(idx))
        bar.close()
        return out

    def get_model_info(self) -> dict:
        cfg = self.sampler.config
        return {"model_num_parameters": cfg.n_params, "model_dtype": cfg.compute_dtype,
                "mesh": dict(self.sampler.mesh.shape)}
