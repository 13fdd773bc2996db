"""Flax models written the way the Flax guides write them, and saved the way they save.

* nnx: a CNN with ``nnx.BatchNorm`` and ``nnx.Dropout(rate, rngs=rngs)`` (its RNG state is
  part of the model's state), trained a few steps in train mode, saved with
  ``ocp.StandardCheckpointer().save(path, nnx.state(model))`` or a ``CheckpointManager``,
  restored with ``load_checkpoint_dir(path, like=model)``;
* linen: a flaxmodels-style ResNet block whose ``__call__(x, train=True)`` needs
  ``train=False`` for TRAK (``linen_model(module, train=False)``), its variables dict saved
  with orbax; bound modules and classes passed by mistake get messages with the fix.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen, nnx

import trax_attr
from trax_attr.gradients import leaf_path
from trax_attr.models.checkpoints import load_checkpoint_dir
from trax_attr.tasks import classification_margin

N_TRAIN, N_TARGETS = 16, 8  # training rows featurized 8 at a time: one batch shape


@pytest.fixture(scope="module")
def digits_nhwc(digits):
    x, y = digits
    x = x.reshape(-1, 8, 8, 1)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:N_TRAIN + N_TARGETS],
                                        y[N_TRAIN:N_TRAIN + N_TARGETS])


class CNN(nnx.Module):
    """The guides' CNN, small: conv-BN-dropout, conv-BN, average pool, two linears."""

    def __init__(self, width: int = 8, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, width, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(width, rngs=rngs)
        self.dropout1 = nnx.Dropout(0.3, rngs=rngs)
        self.conv2 = nnx.Conv(width, 16, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(16, rngs=rngs)
        self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(16 * 4 * 4, 32, rngs=rngs)
        self.dropout2 = nnx.Dropout(0.3, rngs=rngs)
        self.linear2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.dropout1(self.batch_norm1(self.conv1(x))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)
        return self.linear2(self.dropout2(nnx.relu(self.linear1(x))))


def train_cnn(x, y, steps=5, seed=0) -> CNN:
    """The guides' loop: model.train(), nnx.Optimizer, nnx.jit'd step; left in train mode."""
    model = CNN(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, grads)

    model.train()
    for _ in range(steps):
        step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
    return model


@pytest.fixture(scope="module")
def trained(digits_nhwc):
    (x, y), _ = digits_nhwc
    return train_cnn(x, y)


def leaves(tree):
    """{path: numpy array} with PRNG keys as their key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[leaf_path(path)] = np.asarray(leaf)
    return out


def assert_same_state(got, want):
    a, b = leaves(got), leaves(want)
    assert sorted(a) == sorted(b)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def trak_train_features(model, checkpoint, data, tmp_path, **kwargs):
    """The one-line TRAKer call; its stored training features."""
    (x, y), (tx, ty) = data
    traker = trax_attr.TRAKer(model=model, task="image_classification", train_set_size=N_TRAIN,
                              save_dir=tmp_path, proj_dim=64, proj_dtype=jnp.float32, **kwargs)
    traker.load_checkpoint(checkpoint, model_id=0)
    for start in range(0, N_TRAIN, N_TARGETS):
        traker.featurize(batch=(x[start:start + N_TARGETS], y[start:start + N_TARGETS]),
                         num_samples=N_TARGETS)
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="t", checkpoint=checkpoint, model_id=0,
                                    num_targets=N_TARGETS)
    traker.score(batch=(tx, ty), num_samples=N_TARGETS)
    scores = traker.finalize_scores(exp_name="t")
    assert np.isfinite(scores).all()
    return traker.train_features(0)


# --- nnx -------------------------------------------------------------------------------------

def test_nnx_standard_checkpointer_round_trip(trained, digits_nhwc, tmp_path):
    """Saved as the guides save (nnx.state, RNG keys of Dropout included), restored into a
    fresh model's structure, the checkpoint gives the trained model's features exactly."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", nnx.state(trained))
    checkpointer.wait_until_finished()
    fresh = CNN(rngs=nnx.Rngs(42))
    restored = load_checkpoint_dir(tmp_path / "state", like=fresh)
    assert isinstance(restored, nnx.State)
    assert_same_state(restored, nnx.state(trained))
    assert trained.dropout1.deterministic is False  # the user's model stays in train mode
    via_file = trak_train_features(fresh, restored, digits_nhwc, tmp_path / "a")
    direct = trak_train_features(trained, None, digits_nhwc, tmp_path / "b")
    np.testing.assert_allclose(via_file, direct, rtol=1e-6, atol=1e-7)
    assert trained.dropout1.deterministic is False


def test_nnx_checkpoint_manager_steps(trained, tmp_path):
    graphdef, state = nnx.split(trained)
    manager = ocp.CheckpointManager(tmp_path / "run")
    other = nnx.state(CNN(rngs=nnx.Rngs(7)))
    manager.save(1, args=ocp.args.StandardSave(other))
    manager.save(2, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    like = CNN(rngs=nnx.Rngs(0))
    assert_same_state(load_checkpoint_dir(tmp_path / "run", like=like), state)  # latest
    assert_same_state(load_checkpoint_dir(tmp_path / "run", like=like, step=1), other)
    assert_same_state(load_checkpoint_dir(tmp_path / "run" / "2", like=like), state)
    with pytest.raises(ValueError, match=r"step=5 is not in .* its steps are \[1, 2\]"):
        load_checkpoint_dir(tmp_path / "run", like=like, step=5)


def test_wrong_architecture_is_named(trained, tmp_path):
    """A checkpoint of another width is refused with the differing leaves named, in the
    loader and in TRAKer.load_checkpoint (not later, as "Incorrect number of leaves")."""
    narrow = CNN(width=4, rngs=nnx.Rngs(0))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "narrow", nnx.state(narrow))
    checkpointer.wait_until_finished()
    with pytest.raises(ValueError, match=r"conv1/kernel: \(3, 3, 1, 4\) vs \(3, 3, 1, 8\)"):
        load_checkpoint_dir(tmp_path / "narrow", like=trained)
    traker = trax_attr.TRAKer(model=trained, train_set_size=4, save_dir=tmp_path / "t",
                              proj_dim=8)
    with pytest.raises(ValueError, match=r"does not fit CNN: shapes differ .*batch_norm1/bias"):
        traker.load_checkpoint(nnx.state(narrow), model_id=0)

    class Smaller(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)

    with pytest.raises(ValueError, match=r"missing from the checkpoint: batch_norm1/bias"):
        traker.load_checkpoint(nnx.state(Smaller(nnx.Rngs(0))), model_id=0)


def test_class_instead_of_model_says_how(tmp_path):
    with pytest.raises(TypeError, match=r"model=CNN is a class.*CNN\(\.\.\., rngs=nnx.Rngs"):
        trax_attr.TRAKer(model=CNN, train_set_size=4, save_dir=tmp_path)
    with pytest.raises(TypeError, match=r"linen_model\(Block\(\.\.\.\), train=False\)"):
        trax_attr.TRAKer(model=Block, train_set_size=4, save_dir=tmp_path)


# --- linen -----------------------------------------------------------------------------------

class Block(linen.Module):
    """flaxmodels' ResNet style: BatchNorm(use_running_average=not train), train=True by
    default, so TRAK must call it with train=False."""

    features: int = 8

    @linen.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(linen.BatchNorm, use_running_average=not train, momentum=0.9)
        h = linen.relu(norm(name="bn1")(linen.Conv(self.features, (3, 3), name="conv1")(x)))
        h = norm(name="bn2")(linen.Conv(self.features, (3, 3), name="conv2")(h))
        h = linen.relu(h + linen.Conv(self.features, (1, 1), name="shortcut")(x))
        return linen.Dense(10, name="head")(h.mean((1, 2)))


@pytest.fixture(scope="module")
def block_variables(digits_nhwc):
    """Variables after one train-mode step of the BatchNorm statistics."""
    (x, _), _ = digits_nhwc
    variables = jax.jit(functools.partial(Block().init, train=False))(
        jax.random.key(0), jnp.asarray(x[:2]))
    step = jax.jit(functools.partial(Block().apply, train=True, mutable=["batch_stats"]))
    _, updates = step(variables, jnp.asarray(x))  # one compilation, not one per op
    return {"params": variables["params"], **updates}


def test_linen_needs_train_false_and_says_so(block_variables, digits_nhwc, tmp_path):
    (x, y), _ = digits_nhwc
    traker = trax_attr.TRAKer(model=Block(), train_set_size=N_TRAIN, save_dir=tmp_path / "a",
                              proj_dim=8)
    traker.load_checkpoint(block_variables, model_id=0)
    with pytest.raises(ValueError, match=r"linen_model\(module, train=False\)"):
        traker.featurize(batch=(x, y), num_samples=N_TRAIN)


def test_linen_features_equal_jax_autodiff(block_variables, digits_nhwc, tmp_path):
    """linen_model(module, train=False) through the one-line call (and through an orbax
    round trip of the variables dict) equals per-example gradients by hand."""
    (x, y), _ = digits_nhwc
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "vars", block_variables)
    checkpointer.wait_until_finished()
    restored = load_checkpoint_dir(tmp_path / "vars", like=block_variables)
    assert_same_state(restored, block_variables)
    model = trax_attr.linen_model(Block(), train=False)
    traker = trax_attr.TRAKer(model=model, train_set_size=N_TRAIN, save_dir=tmp_path / "t",
                              projector="identity")
    traker.load_checkpoint(restored, model_id=0)
    traker.featurize(batch=(x, y), num_samples=N_TRAIN)
    got = traker.train_features(0)

    stats = {"batch_stats": block_variables["batch_stats"]}

    def margin(params, image, label):
        logits = Block().apply({"params": params, **stats}, image[None], train=False)[0]
        return classification_margin(logits, label)

    grads = jax.jit(jax.vmap(jax.grad(margin), in_axes=(None, 0, 0)))(
        block_variables["params"], jnp.asarray(x), jnp.asarray(y))
    flat = jnp.concatenate([g.reshape(N_TRAIN, -1) for g in jax.tree_util.tree_leaves(grads)],
                           axis=1)
    want = np.asarray(flat) / np.sqrt(flat.shape[1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())

    bound = trax_attr.linen_model(Block().bind(restored), train=False)  # variables by default
    phi, _ = trax_attr.featurize(bound, None, (x[:4], y[:4]))
    np.testing.assert_allclose(np.asarray(phi), want[:4], rtol=1e-5,
                               atol=1e-6 * np.abs(want).max())
