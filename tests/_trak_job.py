"""A small TRAKer job on digits, run whole or killed with SIGKILL at a chosen store event.

Run as ``python tests/_trak_job.py SAVE_DIR DATA_NPZ PHASE EVENT``: counts every flush of a
memory map, rename and fsync (before and after each; for a URL store, every completed row
write and metadata write) made inside TRAKer.PHASE and kills
itself with SIGKILL at event number EVENT of that phase (0: never). Prints READY once set
up, DONE when the scores are final.
The tests import :func:`run` to make the uninterrupted reference in-process.
"""

import os
import signal
import sys

import numpy as np

N_TRAIN, N_TARGETS, TRAIN_BATCH, TARGET_BATCH = 256, 32, 32, 16


def write_data(path):
    """Save the digits arrays the job uses (the child then skips importing sklearn)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(path, x=(digits.data / 16.0).astype(np.float32), y=digits.target.astype(np.int32))


def data(path):
    with np.load(path, allow_pickle=False) as arrays:
        x, y = arrays["x"], arrays["y"]
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[1500:1500 + N_TARGETS], y[1500:1500 + N_TARGETS])


def checkpoints():
    out = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        out.append({"w": (0.3 * rng.standard_normal((64, 10))).astype(np.float32),
                    "b": (0.1 * rng.standard_normal(10)).astype(np.float32)})
    return out


def apply(params, x):
    return x @ params["w"] + params["b"]


def run(save_dir, data_path):
    """The whole workflow; every step resumes what is on disk. Returns the scores."""
    import jax.numpy as jnp

    import trax_attr

    train, target = data(data_path)
    traker = trax_attr.TRAKer(model=apply, task="image_classification",
                              train_set_size=N_TRAIN, save_dir=save_dir, proj_dim=32,
                              proj_dtype=jnp.float32, lambda_reg=1e-2)
    ckpts = checkpoints()
    print("READY", flush=True)
    for model_id, params in enumerate(ckpts):
        if traker.finalized(model_id):
            continue
        traker.load_checkpoint(params, model_id=model_id)
        for start in range(0, N_TRAIN, TRAIN_BATCH):
            batch = tuple(a[start:start + TRAIN_BATCH] for a in train)
            traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()
    for model_id, params in enumerate(ckpts):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=model_id,
                                        num_targets=N_TARGETS)
        for start in range(0, N_TARGETS, TARGET_BATCH):
            batch = tuple(a[start:start + TARGET_BATCH] for a in target)
            traker.score(batch=batch, num_samples=len(batch[0]))
    return traker.finalize_scores(exp_name="test")


PHASES = ("featurize", "finalize_features", "score", "finalize_scores")


def count_events(on_event):
    """Call ``on_event(phase)`` before and after every memmap flush, rename and fsync;
    ``phase`` is the TRAKer method running (PHASES), or None outside them."""
    import trax_attr

    phase = [None]

    def wrap(fn):
        def wrapped(*args, **kwargs):
            on_event(phase[0])
            out = fn(*args, **kwargs)
            on_event(phase[0])
            return out
        return wrapped

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = None
        return wrapped

    patches = [(np.memmap, "flush", wrap(np.memmap.flush)), (os, "replace", wrap(os.replace)),
               (os, "fsync", wrap(os.fsync))]
    try:  # a URL store: every completed PUT of rows and every metadata write
        from trax_attr.store.objects import Objects
        from trax_attr.store.objrows import ObjectRows
    except ImportError:
        pass
    else:
        patches += [(ObjectRows, "wait", wrap(ObjectRows.wait)),
                    (Objects, "write_json", wrap(Objects.write_json))]
    patches += [(trax_attr.TRAKer, name, in_phase(name, getattr(trax_attr.TRAKer, name)))
                for name in PHASES]
    return patches


if __name__ == "__main__":
    save_dir, data_path = sys.argv[1], sys.argv[2]
    kill_phase, kill_at = sys.argv[3], int(sys.argv[4])
    seen = [0]

    def on_event(phase):
        if phase == kill_phase:
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    if kill_at:
        for owner, name, value in count_events(on_event):
            setattr(owner, name, value)
    run(save_dir, data_path)
    print("DONE", flush=True)
