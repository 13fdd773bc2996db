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


def run(mesh, save_dir, digits, checkpoints, max_cache_bytes=1 << 30, solve="auto"):
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
    traker.finalize_features(solve=solve)
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
        a, b, c, lambda_reg=0.05, chunk_rows=300, mesh=traker.mesh, solve=solve))(grads, q,
                                                                                 targets))
    extra = {}
    if solve == "sharded":  # another λ: the stored XᵀX read back by rows, solved again
        traker.finalize_features(lambda_reg=0.1, solve="sharded")
        extra["relambda"] = np.asarray(traker.store.finished(0, "inverse", (96, 96),
                                                             np.float32))
        extra["xtx"] = np.asarray(traker.store.finished(0, "xtx", (96, 96), np.float32))
    return dict(scores=scores, grads=grads, q=q, targets=targets, functional=functional,
                **top._asdict(), **extra)


def solve_checks(root):
    """The sharded kernels on 8 devices against single-device and float64 host results."""
    import warnings

    from trax_attr import streams
    from trax_attr.engine import linalg
    from trax_attr.parallel import solve

    rng = np.random.default_rng(4)
    n, k = 300, 100                      # k pads to 104 over 8 devices (pivot blocks of 13)
    x = (rng.normal(size=(n, k)) * np.linspace(0.2, 2, k)).astype(np.float32)
    devices = jax.devices()  # a 2-D TRAKer mesh: the solve runs over its 8 devices in order
    mesh = solve.solve_mesh(Mesh(np.array(devices).reshape(4, 2), ("rows", "targets")))
    assert list(mesh.devices.flat) == devices and mesh.axis_names == ("gram",)
    lay = solve.layout(k, mesh.size)
    out = {"layout": np.array(lay[:3])}
    acc = streams.stream_gram_sharded(lambda a, b: x[a:b], range(n), -(-n // 64), 64, mesh,
                                       lay)
    out["gram_sharded"] = solve.fetch(acc, lay, mesh)
    out["gram_one"] = streams.stream_gram(lambda a, b: x[a:b], range(n), k, 64,
                                           parallel.default_mesh(jax.devices()[:1]))
    gram64 = x.astype(np.float64).T @ x
    out["gram64"] = gram64
    for name, lam in [("auto", "auto"), ("small", 1e-3 * np.trace(gram64) / k)]:
        value = linalg.resolve_lambda(lam, gram64, n)
        out[f"inverse64_{name}"] = linalg.inverse_gram(gram64, value)
        a, got = solve.inverse(acc if name == "auto" else solve.from_rows(
            lambda s, e: out["gram_sharded"][s:e], lay, mesh, np.float32), n, lam, mesh, lay)
        out[f"inverse_{name}"], out[f"lambda_{name}"] = solve.fetch(a, lay, mesh), got
        out[f"lambda64_{name}"] = value
    a, _ = solve.inverse(solve.from_rows(lambda s, e: gram64[s:e], lay, mesh, np.float32), n,
                         0.5, mesh, lay, traker_inverse_rescale=True)
    out["rescaled"] = solve.fetch(a, lay, mesh)
    out["rescaled64"] = linalg.inverse_gram(gram64, 0.5, traker_inverse_rescale=True)
    # λ = 0 with n < k: not positive definite, refused with the fix
    few = x[:40]
    singular = solve.from_rows(lambda s, e: (few.T @ few)[s:e], lay, mesh, np.float32)
    try:
        solve.inverse(singular, 40, 0.0, mesh, lay)
        out["singular"] = np.array("no error")
    except ValueError as err:
        out["singular"] = np.array(str(err))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spread = np.diag(np.logspace(4, -3, k)).astype(np.float32)  # cond 1e7, exact in f32
        solve.inverse(solve.from_rows(lambda s, e: spread[s:e], lay, mesh, np.float32), n,
                      0.0, mesh, lay)
    out["ill_warned"] = np.array([str(w.message) for w in caught
                                  if issubclass(w.category, linalg.IllConditionedWarning)] + [""])
    return {f"solve_{key}": value for key, value in out.items()}


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
    grid = Mesh(np.array(devices).reshape(4, 2), ("rows", "targets"))
    for name, mesh in [("one", parallel.default_mesh(devices[:1])),
                       ("eight", None),
                       ("grid", grid),
                       ("proj", Mesh(np.array(devices).reshape(4, 2), ("data", "proj"))),
                       ("projgen", Mesh(np.array(devices).reshape(2, 4), ("data", "proj"))),
                       ("sharded", None)]:
        # projgen: P not cached, its column blocks generated inside the kernel.
        cache = 0 if name == "projgen" else 1 << 30
        solve = "sharded" if name == "sharded" else "auto"
        for key, value in run(mesh, f"{root}/{name}", digits, checkpoints, cache,
                              solve).items():
            results[f"{name}_{key}"] = value
    results.update(solve_checks(root))
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
