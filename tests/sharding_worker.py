"""Run in a subprocess with 8 simulated CPU devices (JAX_NUM_CPU_DEVICES=8) by
test_sharding.py: the same TRAK run on meshes of 1, 8 and 4x2 devices, saved to an npz."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import trax_attr
from trax_attr import parallel
from trax_attr.store import read_rows


def run(mesh, save_dir, digits, checkpoints, max_cache_bytes=1 << 30):
    x, y = digits
    n, m = 1000, 24
    traker = trax_attr.TRAKer(model=lambda p, v: v @ p["w"] + p["b"], train_set_size=n,
                              save_dir=save_dir, lambda_reg=0.05, chunk_rows=300, mesh=mesh,
                              projector=trax_attr.rademacher(96, dtype=jnp.float32,
                                                             max_cache_bytes=max_cache_bytes))
    for model_id, params in enumerate(checkpoints):
        traker.load_checkpoint(params, model_id=model_id)
        for start in range(0, n, 100):  # 100 rows: padded to a multiple of 8 devices
            traker.featurize(batch=(x[start:start + 100], y[start:start + 100]), num_samples=100)
    traker.finalize_features()
    for model_id, params in enumerate(checkpoints):
        traker.start_scoring_checkpoint(exp_name="t", checkpoint=params, model_id=model_id,
                                        num_targets=m)
        traker.score(batch=(x[n:n + 13], y[n:n + 13]), num_samples=13)
        traker.score(batch=(x[n + 13:n + m], y[n + 13:n + m]), num_samples=m - 13)
    scores = traker.finalize_scores("t")
    top = traker.finalize_scores("t", top_k=7, target_chunk=10)
    # The stored rows, for a float64 closed form of the scores in the test.
    grads = np.stack([read_rows(traker.store.array_path(i, "grads"), 0, n) for i in (0, 1)])
    q = np.stack([read_rows(traker.store.array_path(i, "out_to_loss"), 0, n) for i in (0, 1)])
    targets = np.stack([np.asarray(traker.store.target_arrays("t", i, m, 96)["grads"])
                        for i in (0, 1)])
    # the functional core on the same rows, mesh and chunks: the same kernels
    functional = np.asarray(jax.jit(lambda a, b, c: trax_attr.trak_scores(
        a, b, c, lambda_reg=0.05, chunk_rows=300, mesh=traker.mesh))(grads, q, targets))
    return dict(scores=scores, grads=grads, q=q, targets=targets, functional=functional,
                **top._asdict())


def main(out, root):
    assert jax.device_count() == 8, jax.devices()
    from sklearn.datasets import load_digits

    data = load_digits()
    digits = ((data.data / 16.0).astype(np.float32), data.target.astype(np.int32))
    rng = np.random.default_rng(0)
    checkpoints = [{"w": rng.normal(0, 0.3, (64, 10)).astype(np.float32),
                    "b": rng.normal(0, 0.1, 10).astype(np.float32)} for _ in range(2)]
    devices = jax.devices()
    results = {}
    for name, mesh in [("one", parallel.default_mesh(devices[:1])),
                       ("eight", None),
                       ("grid", Mesh(np.array(devices).reshape(4, 2), ("rows", "targets"))),
                       ("proj", Mesh(np.array(devices).reshape(4, 2), ("data", "proj"))),
                       ("projgen", Mesh(np.array(devices).reshape(2, 4), ("data", "proj")))]:
        # projgen: P not cached, its column blocks generated inside the kernel.
        cache = 0 if name == "projgen" else 1 << 30
        for key, value in run(mesh, f"{root}/{name}", digits, checkpoints, cache).items():
            results[f"{name}_{key}"] = value
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
