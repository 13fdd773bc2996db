"""Orbax checkpoint directories in and out, and TRAKer's optional progress bar."""

import numpy as np
import pytest
from flax import nnx

import trax_attr
from linear_model import linear_apply
from trax_attr.models.checkpoints import load_checkpoint_dir, save_checkpoint_dir


def test_orbax_roundtrip_into_an_nnx_structure(tmp_path):
    saved = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    other = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    before = np.asarray(other.kernel[...]).copy()
    save_checkpoint_dir(tmp_path / "ckpt", saved)
    state = load_checkpoint_dir(tmp_path / "ckpt", like=other)
    assert isinstance(state, nnx.State)
    np.testing.assert_array_equal(np.asarray(state["kernel"][...]), np.asarray(saved.kernel[...]))
    np.testing.assert_array_equal(np.asarray(other.kernel[...]), before)   # like is untouched
    raw = load_checkpoint_dir(tmp_path / "ckpt")
    assert sorted(raw) == ["bias", "kernel"]
    np.testing.assert_array_equal(np.asarray(raw["bias"]), np.asarray(saved.bias[...]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_dir(tmp_path / "nope")


def test_progress_bar_counts_rows(tmp_path, digits, linear_checkpoints, capsys):
    x, y = digits
    traker = trax_attr.TRAKer(model=linear_apply, train_set_size=64, save_dir=tmp_path,
                              proj_dim=8, progress=True)
    traker.load_checkpoint(linear_checkpoints[0], model_id=0)
    for start in range(0, 64, 16):
        traker.featurize(batch=(x[start:start + 16], y[start:start + 16]), num_samples=16)
    err = capsys.readouterr().err
    assert "featurize model 0" in err and "64/64" in err and "rows/s" in err
    quiet = trax_attr.TRAKer(model=linear_apply, train_set_size=64, save_dir=tmp_path / "q",
                             proj_dim=8)
    quiet.load_checkpoint(linear_checkpoints[0], model_id=0)
    quiet.featurize(batch=(x[:64], y[:64]), num_samples=64)
    assert capsys.readouterr().err == ""
