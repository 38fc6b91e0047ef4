"""Fine-tuning from a full checkpoint restarts the LR schedule but keeps Adam's state (mtj device_train.py)."""
import numpy as np
import optax

from mesh_transformer.config import load_config
from mesh_transformer.finetune import restart_schedule
from mesh_transformer.train import make_optimizer


def test_restart_schedule_zeroes_only_the_schedule_step():
    cfg = load_config("tiny")
    params = {"w": {"w": np.ones((3, 4), np.float32)}}
    opt = make_optimizer(cfg)
    state = opt.init(params)
    grads = {"w": {"w": np.full((3, 4), 0.5, np.float32)}}
    for _ in range(3):
        _, state = opt.update(grads, state, params)
    restarted = restart_schedule(state)
    sched = [s for s in restarted if isinstance(s, optax.ScaleByScheduleState)]
    adam = [s for s in restarted if isinstance(s, optax.ScaleByAdamState)]
    assert len(sched) == 1 and int(sched[0].count) == 0
    assert int(adam[0].count) == 3
    old_adam = [s for s in state if isinstance(s, optax.ScaleByAdamState)][0]
    np.testing.assert_array_equal(adam[0].mu["w"]["w"], old_adam.mu["w"]["w"])
