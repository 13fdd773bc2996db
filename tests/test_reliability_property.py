"""Property: any interleaving of featurize calls over random index batches, with crashes
in between (at any store write, the TRAKer then abandoned and the store reopened), ends
with the same stored rows and features as one clean pass."""

import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trax_attr
from linear_model import linear_apply

N, B, K = 48, 8, 16


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no library code can swallow it."""


def make(save_dir):
    return trax_attr.TRAKer(model=linear_apply, task="image_classification", train_set_size=N,
                            save_dir=save_dir, proj_dim=K, proj_dtype=jnp.float32,
                            lambda_reg=1e-2)


@pytest.fixture(scope="module")
def setup(digits, linear_checkpoints, tmp_path_factory):
    """The clean pass's rows and its finalized inverse."""
    x, y = digits
    train = (x[:N], y[:N])
    traker = make(tmp_path_factory.mktemp("clean"))
    params = linear_checkpoints[0]
    traker.load_checkpoint(params, model_id=0)
    for start in range(0, N, B):
        traker.featurize(batch=tuple(a[start:start + B] for a in train), num_samples=B)
    traker.finalize_features()
    rows = {name: np.array(a) for name, a in
            traker.store.model_arrays(0, N, K, mode="r").items()}
    inverse = np.array(traker.store.finished(0, "inverse", (K, K), np.float32))
    return _Setup((train, params, rows, inverse))


class _Setup(tuple):
    def __repr__(self):  # hypothesis prints the arguments of a failing example
        return "<clean pass>"


batches = st.lists(st.integers(0, N - 1), min_size=B, max_size=B, unique=True)
steps = st.lists(st.tuples(batches, st.none() | st.integers(1, 8), st.booleans()),
                 min_size=1, max_size=8)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps)
def test_interleaved_featurize_with_crashes_equals_one_clean_pass(setup, steps):
    train, params, clean_rows, clean_inverse = setup
    folder = tempfile.mkdtemp(prefix="trax_prop_")
    events = [0, None]

    def counted(fn):
        def wrapped(*args, **kwargs):
            events[0] += 1
            if events[0] == events[1]:
                raise _Killed
            return fn(*args, **kwargs)
        return wrapped

    originals = (np.memmap.flush, os.replace, os.fsync)
    np.memmap.flush, os.replace, os.fsync = (counted(f) for f in originals)

    def open_traker():
        traker = make(folder)
        traker.load_checkpoint(params, model_id=0)  # compiled once: the jit is shared
        return traker

    try:
        traker = open_traker()
        for inds, kill_at, reopen in steps:
            inds = np.array(inds)
            events[0], events[1] = 0, kill_at
            try:
                traker.featurize(batch=tuple(a[inds] for a in train), inds=inds)
            except _Killed:
                reopen = True  # a killed process starts over from the disk
            events[1] = None
            if reopen:
                traker = open_traker()
        for start in range(0, N, B):  # the resumed loop: every row, done ones skipped
            inds = np.arange(start, start + B)
            traker.featurize(batch=tuple(a[inds] for a in train), inds=inds)
        traker.finalize_features()
        rows = traker.store.model_arrays(0, N, K, mode="r")
        np.testing.assert_array_equal(rows["done"], clean_rows["done"])
        # a row computed in another batch composition (padded subsets of a partly done
        # batch) may differ in float32 rounding: ~1e-7 of the array's scale, never more
        for name in ("grads", "out_to_loss"):
            scale = np.abs(clean_rows[name]).max()
            np.testing.assert_allclose(rows[name], clean_rows[name], rtol=1e-6,
                                       atol=1e-6 * scale)
        inverse = traker.store.finished(0, "inverse", (K, K), np.float32)
        np.testing.assert_allclose(inverse, clean_inverse, rtol=1e-5,
                                   atol=1e-5 * np.abs(clean_inverse).max())
    finally:
        np.memmap.flush, os.replace, os.fsync = originals
        shutil.rmtree(folder, ignore_errors=True)
