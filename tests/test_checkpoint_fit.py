"""Every Flax checkpoint form is checked against the model before anything is computed,
the differing leaves named with the fix: nnx Modules, States (all variables or parameters
only) and their nested dicts, linen variables dicts for bound and unbound modules, orbax
directories. (torch state_dicts: tests/interop/test_torch_models.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen, nnx

import trax_attr
from trax_attr.models.checkpoints import CheckpointMismatchError, load_checkpoint_dir

N = 6


class MLP(nnx.Module):
    def __init__(self, width=8, *, rngs):
        self.l1 = nnx.Linear(64, width, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # RNG key leaves in the state
        self.l2 = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


class Net(linen.Module):
    width: int = 8

    @linen.compact
    def __call__(self, x, train: bool = True):
        h = linen.Dense(self.width, name="l1")(x)
        h = linen.BatchNorm(use_running_average=not train, name="bn")(h)
        return linen.Dense(10, name="l2")(linen.relu(h))


@pytest.fixture(scope="module")
def batch(digits):
    x, y = digits
    return x[:N], y[:N]


def traker(model, tmp_path, **kwargs):
    return trax_attr.TRAKer(model=model, train_set_size=N, save_dir=tmp_path, proj_dim=8,
                            proj_dtype=jnp.float32, **kwargs)


def features(model, checkpoint, batch, tmp_path):
    t = traker(model, tmp_path)
    t.load_checkpoint(checkpoint, model_id=0)
    t.featurize(batch=batch, num_samples=N)
    return t.train_features(0)


# --- nnx -------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["module", "state", "params state", "pure dict",
                                  "orbax without like"])
def test_nnx_wrong_width_refused_at_load(form, tmp_path):
    narrow = MLP(4, rngs=nnx.Rngs(0))
    checkpoint = {"module": narrow, "state": nnx.state(narrow),
                  "params state": nnx.state(narrow, nnx.Param),
                  "pure dict": nnx.to_pure_dict(nnx.state(narrow))}.get(form)
    if form == "orbax without like":
        trax_attr.models.checkpoints.save_checkpoint_dir(tmp_path / "c", narrow)
        checkpoint = load_checkpoint_dir(tmp_path / "c")
    t = traker(MLP(rngs=nnx.Rngs(1)), tmp_path / "t")
    with pytest.raises(CheckpointMismatchError,
                       match=r"does not fit MLP: shapes differ .*l1/kernel: \(64, 4\) vs "
                             r"\(64, 8\).*nnx.state\(trained_model\)"):
        t.load_checkpoint(checkpoint, model_id=0)


def test_nnx_pure_dict_missing_leaf_named(tmp_path):
    pure = nnx.to_pure_dict(nnx.state(MLP(rngs=nnx.Rngs(0)), nnx.Param))
    del pure["l2"]["bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint: l2/bias$|"
                                                      r"missing from the checkpoint: l2/bias\."):
        traker(MLP(rngs=nnx.Rngs(1)), tmp_path).load_checkpoint(pure, model_id=0)


@pytest.mark.parametrize("form", ["pure dict", "pure params", "orbax without like"])
def test_nnx_dicts_of_arrays_are_the_state(form, batch, tmp_path):
    """A nested dict of arrays (nnx.to_pure_dict, or an orbax checkpoint restored without
    like, 'value' levels and RNG key data included) gives the State's features exactly."""
    trained, model = MLP(rngs=nnx.Rngs(0)), MLP(rngs=nnx.Rngs(1))
    trained.bn.mean[...] = jnp.linspace(-1, 1, 8)
    if form == "orbax without like":
        checkpointer = ocp.StandardCheckpointer()  # as the Flax guides save
        checkpointer.save(tmp_path / "c", nnx.state(trained))
        checkpointer.wait_until_finished()
        checkpoint = load_checkpoint_dir(tmp_path / "c")
        assert set(checkpoint["l1"]["kernel"]) == {"value"}
    else:
        which = nnx.Param if form == "pure params" else ...
        checkpoint = nnx.to_pure_dict(nnx.state(trained, which))
    want_checkpoint = nnx.state(trained, nnx.Param) if form == "pure params" else trained
    got = features(model, checkpoint, batch, tmp_path / "a")
    want = features(model, want_checkpoint, batch, tmp_path / "b")
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got, features(model, None, batch, tmp_path / "c"))


# --- linen -----------------------------------------------------------------------------------

def variables(width=8):
    return Net(width).init(jax.random.key(0), jnp.zeros((1, 64)), train=False)


def wrong_variables():
    good = variables()
    return {
        "narrow": (variables(4), r"shapes differ .*params/l1/kernel: \(64, 4\) vs \(64, 8\)"),
        "missing": ({"params": {"l1": good["params"]["l1"], "bn": good["params"]["bn"]},
                     "batch_stats": good["batch_stats"]},
                    r"missing from the checkpoint: params/l2/bias, params/l2/kernel"),
        "extra": ({"params": {**good["params"], "l3": {"kernel": jnp.ones((8, 2))}},
                   "batch_stats": good["batch_stats"]},
                  r"in the checkpoint but not the .*: params/l3/kernel"),
        "no batch_stats": ({"params": good["params"]},
                           r"it has no 'batch_stats' collection, which Net reads"),
    }


@pytest.mark.parametrize("case", ["narrow", "missing", "extra", "no batch_stats"])
def test_unbound_linen_checkpoint_checked_on_the_first_batch(case, batch, tmp_path):
    """An unbound module knows its shapes only from inputs: the checkpoint is checked
    against module.init's on the first batch (not blamed on the batch), nothing stored."""
    checkpoint, message = wrong_variables()[case]
    t = traker(trax_attr.linen_model(Net(), train=False), tmp_path)
    t.load_checkpoint(checkpoint, model_id=0)
    with pytest.raises(CheckpointMismatchError, match=r"does not fit Net.*" + message
                       + r".*Net\(\.\.\.\)\.init\(key, x, train=False\)") as err:
        t.featurize(batch=batch, num_samples=N)
    assert "cannot run on this batch" not in str(err.value)
    assert not t.store.rows_done(0).any()


@pytest.mark.parametrize("case", ["narrow", "missing", "extra", "no batch_stats"])
def test_bound_linen_checkpoint_checked_at_load(case, tmp_path):
    checkpoint, message = wrong_variables()[case]
    if case == "no batch_stats":
        message = r"missing from the checkpoint: batch_stats/bn/mean, batch_stats/bn/var"
    model = trax_attr.linen_model(Net().bind(variables()), train=False)
    with pytest.raises(CheckpointMismatchError, match=r"does not fit Net.*" + message):
        traker(model, tmp_path).load_checkpoint(checkpoint, model_id=0)


def test_linen_right_checkpoint_features_unchanged_by_the_check(batch, tmp_path):
    """The check is shapes only: bound and unbound give the same features."""
    good = variables()
    unbound = features(trax_attr.linen_model(Net(), train=False), good, batch, tmp_path / "a")
    bound = features(trax_attr.linen_model(Net().bind(good), train=False), None, batch,
                     tmp_path / "b")
    np.testing.assert_array_equal(unbound, bound)


def test_linen_params_alone_says_how_to_wrap(tmp_path):
    with pytest.raises(TypeError, match=r"'params' collection alone: wrap it as \{'params'"):
        traker(trax_attr.linen_model(Net(), train=False), tmp_path).load_checkpoint(
            variables()["params"], model_id=0)


def test_orbax_linen_variables_against_like(tmp_path):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "v", wrong_variables()["missing"][0])
    checkpointer.wait_until_finished()
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint: "
                                                      r"params/l2/bias, params/l2/kernel"):
        load_checkpoint_dir(tmp_path / "v", like=variables())
