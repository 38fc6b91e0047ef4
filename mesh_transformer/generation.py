"""Stop strings around `Sampler.sample` for callers that work on token ids (lm-eval adapter, server): the device-side
stop sets Sampler.generate builds, and the host-side decode + cut."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .sampling import Sampler, truncate_at_stop


def stop_arguments(sampler: Sampler, tokenizer: Any, stop: Sequence[str]) -> dict:
    """The stop_tokens / stop_sequences for Sampler.sample of stop strings (as Sampler.generate builds them)."""
    stop = [s for s in stop if s]
    ids = [sampler.stop_token_ids(tokenizer, s) for s in stop]
    stop_tokens = np.unique(np.concatenate(ids)) if ids else np.zeros((0,), np.int64)
    return dict(stop_tokens=stop_tokens,
                stop_sequences=[seq for seq in (tokenizer.encode(s) for s in stop) if len(seq) > 1])


def decode_completion(tokenizer: Any, tokens: Sequence[int], length: int, stop: Sequence[str]) -> str:
    """Row text of SampleOutput tokens[:length], EOS dropped, cut before the first stop string."""
    ids = [int(t) for t in tokens[:length]]
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return truncate_at_stop(tokenizer.decode(ids), [s for s in stop if s])
