"""Never commit garbage: stop training at the first non-finite loss or gradient norm, before the next checkpoint.

A NaN loss used to train on: every later checkpoint was committed with NaN params, the run printed "done" and
exited 0. `FiniteGuard.check(step, metrics)` runs right after a step's metrics are on the host (the loop syncs
there anyway) and raises `TrainingDiverged` naming the step, the bad figures, the likely cause and the checkpoint
that stays the latest. The step's grad norm is the norm of the gradient its update used, so a step with a finite
loss and grad norm made a finite update (the learning rate is checked finite in the config); a checkpoint taken after
a checked step therefore holds finite params.

`strict_json(record)` replaces NaN / inf by null (JSON has no NaN: strict readers such as `jq` or JavaScript reject
the bare `NaN` token Python writes), for metrics.jsonl.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional


class TrainingDiverged(ValueError):
    """A non-finite loss or gradient norm; the message names the step, the likely cause and the kept checkpoint."""


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def strict_json(obj: Any) -> Any:
    """A copy with every non-finite float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


class FiniteGuard:
    """check(step, metrics) after every step; `latest()` (e.g. checkpoint.latest_step of the folder) says which
    checkpoint stays the latest."""

    WATCHED = ("loss", "grad_norm")

    def __init__(self, cfg: Any, ckpt_path: str, start_step: int, latest: Optional[Any] = None):
        self.cfg, self.ckpt_path, self.start_step = cfg, ckpt_path, int(start_step)
        self._latest = latest
        self.losses: List[float] = []

    def check(self, step: int, metrics: Dict[str, Any]) -> None:
        bad = {k: metrics.get(k) for k in self.WATCHED if k in metrics and not _finite(metrics.get(k))}
        if not bad:
            self.losses.append(float(metrics.get("loss", 0.0)))
            return
        raise TrainingDiverged(self._message(step, metrics, bad))

    def _cause(self, step: int, metrics: Dict[str, Any], bad: Dict[str, Any]) -> str:
        cfg = self.cfg
        if step == self.start_step + 1:
            return ("the very first step is already non-finite: the starting params hold NaN/inf (check the "
                    "checkpoint or --tune-model-path), or the data holds token ids the model cannot embed, or a "
                    "config value (lr, end_lr, weight_decay, z_loss) is extreme")
        if "loss" not in bad and "grad_norm" in bad:
            return (f"the gradient overflowed while the loss was finite ({metrics.get('loss'):.4g}): with "
                    f"compute_dtype {cfg.compute_dtype} try float32, or lower lr ({cfg.lr})")
        finite = [x for x in self.losses if math.isfinite(x)]
        if len(finite) >= 2 and finite[-1] > 1.5 * min(finite):
            return (f"the loss was rising ({min(finite):.4g} -> {finite[-1]:.4g}) before it diverged: the learning "
                    f"rate lr={cfg.lr} is probably too high for this model; lower lr or raise warmup_steps")
        return (f"a bad batch (check the records near this step) or a learning rate too high for this model "
                f"(lr={cfg.lr})")

    def _message(self, step: int, metrics: Dict[str, Any], bad: Dict[str, Any]) -> str:
        latest = None
        if callable(self._latest):
            try:
                latest = self._latest()
            except Exception:  # only the message is at stake
                latest = None
        figures = ", ".join(f"{k} is {v}" for k, v in bad.items())
        kept = (f"the latest checkpoint stays step {latest} in {self.ckpt_path}" if latest is not None else
                f"no checkpoint was written to {self.ckpt_path}")
        return (f"training stopped at step {step}: {figures}; likely cause: {self._cause(step, metrics, bad)}. "
                f"Nothing of this step was saved: {kept}; fix the cause and rerun to resume from there")
