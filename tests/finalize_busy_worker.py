"""Run by test_sharding.py under ``python -m trax_attr.parallel.launch --num-processes 2``: every
process featurizes its rows, then calls finalize_features while the test process holds the
checkpoint's lock (shared, as a featurizer does). Each rank writes what it raised to
``<out>.<rank>``; the test checks that both ranks raised StoreBusyError (none hangs)."""

import sys

import numpy as np


def main(save_dir, out, ready):
    from trax_attr.parallel import launch

    launch.initialize()
    import jax
    import jax.numpy as jnp

    import trax_attr
    from trax_attr import parallel

    n = 40
    x = np.random.default_rng(0).normal(size=(n, 6)).astype(np.float32)
    y = (np.arange(n) % 3).astype(np.int32)
    traker = trax_attr.TRAKer(model=lambda p, v: v @ p, train_set_size=n, save_dir=save_dir,
                              proj_dim=8, proj_dtype=jnp.float32)
    traker.load_checkpoint(np.ones((6, 3), np.float32), model_id=0)
    mine = parallel.process_rows(n)
    traker.featurize((x[mine.start:mine.stop], y[mine.start:mine.stop]),
                     inds=np.arange(mine.start, mine.stop))
    parallel.barrier()
    if jax.process_index() == 0:
        open(ready, "w").close()
    while not __import__("os").path.exists(ready + ".locked"):
        __import__("time").sleep(0.05)
    try:
        traker.finalize_features()
        result = "finalized"
    except trax_attr.StoreBusyError as err:
        result = f"busy: {err}"
    with open(f"{out}.{jax.process_index()}", "w") as handle:
        handle.write(result)


if __name__ == "__main__":
    main(*sys.argv[1:4])
