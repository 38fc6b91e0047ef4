"""One process of a multi-process test run: device_train.py's run with its flags, then (--dump FILE) process 0
writes the final TrainState, gathered from all processes, as an npz of flattened leaves. Test-only."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
    dump = None
    if "--dump" in argv:
        i = argv.index("--dump")
        dump, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    import device_train
    from mesh_transformer.cli_util import setup_logging
    setup_logging()
    state = device_train.run(device_train.parse_args(argv), argv)
    if dump:
        import jax
        import numpy as np
        from jax.experimental import multihost_utils
        full = multihost_utils.process_allgather(state, tiled=True)  # every leaf whole, on every host
        if jax.process_index() == 0:
            leaves = jax.tree_util.tree_leaves_with_path(full)
            np.savez(dump, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
