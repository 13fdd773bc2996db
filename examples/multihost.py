"""TRAK over several processes sharing one store: each featurizes and scores its own rows.

One machine, two CPU processes (gloo collectives)::

    python -m trax_attr.parallel.launch --num-processes 2 examples/multihost.py --save-dir /tmp/trak_mh

A cluster: run this script once per host with the cluster's launcher (srun, ...) and a
save_dir on a shared file system; trax_attr.parallel.launch.initialize() then reads the cluster's
environment. The same script with one process gives the same scores. ``--solve sharded``
splits XᵀX and its inverse by rows over every process's devices (the path for large
proj_dim; float32), ``--solve host`` factorises it in float64 on each host.
"""

import argparse

import numpy as np


def train_linear(x, y, seed, steps=30):
    """A linear softmax classifier on digits, trained identically in every process."""
    import jax
    import jax.numpy as jnp

    params = {"w": 0.01 * jax.random.normal(jax.random.key(seed), (64, 10)), "b": jnp.zeros(10)}

    def loss(p):
        logits = x @ p["w"] + p["b"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p)))
    for _ in range(steps):
        params = step(params)
    return jax.tree.map(np.asarray, params)


def apply(params, x):
    return x @ params["w"] + params["b"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--out", default=None, help="npz of the scores (process 0)")
    parser.add_argument("--n-train", type=int, default=1200)
    parser.add_argument("--n-targets", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--solve", default="auto", choices=("auto", "host", "sharded"))
    opts = parser.parse_args()

    from trax_attr.parallel import launch

    launch.initialize()  # before any other JAX call
    import jax
    import jax.numpy as jnp
    from sklearn.datasets import load_digits

    import trax_attr
    from trax_attr import parallel

    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)
    n, m = opts.n_train, opts.n_targets
    train, target = (x[:n], y[:n]), (x[n:n + m], y[n:n + m])
    checkpoints = [train_linear(x[:n], y[:n], seed) for seed in (0, 1)]

    traker = trax_attr.TRAKer(model=apply, task="image_classification", train_set_size=n,
                              save_dir=opts.save_dir, proj_dim=128, proj_dtype=jnp.float32,
                              chunk_rows=256)
    mine = parallel.process_rows(n)  # this process's rows
    for model_id, params in enumerate(checkpoints):
        traker.load_checkpoint(params, model_id=model_id)
        for start in range(mine.start, mine.stop, 100):
            inds = np.arange(start, min(start + 100, mine.stop))
            traker.featurize(batch=(train[0][inds], train[1][inds]), inds=inds)
    traker.finalize_features(solve=opts.solve)  # every process; XᵀX over all of them

    if jax.process_index() == 0:  # targets are few: one process featurizes them
        for model_id, params in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name="test", checkpoint=params,
                                            model_id=model_id, num_targets=m)
            traker.score(batch=target, num_samples=m)
    # every process: each scores its own training rows; all get every score
    scores = traker.finalize_scores(exp_name="test")
    top = traker.finalize_scores(exp_name="test", top_k=opts.top_k)
    print(f"process {jax.process_index()} of {jax.process_count()}: scores {scores.shape}, "
          f"best proponent of target 0: row {top.proponents[0, 0]}")
    if opts.out and jax.process_index() == 0:
        np.savez(opts.out, scores=scores, **top._asdict())


if __name__ == "__main__":
    main()
