"""Task-specific checks beyond the shared suite: the tutorial's classification facts, the
registry, CLIP's sampling and bank, causal-LM masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import trax_attr
from trax_attr.tasks import classification_margin, one_minus_p
import task_models as tm


# --- classification, as in the tutorial -------------------------------------------------
def test_margin_is_log_odds_of_the_true_class():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)) * 3
    labels = rng.integers(0, 7, 50)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True))[np.arange(50), labels]
    margins = jax.vmap(classification_margin)(jnp.asarray(logits, jnp.float32), labels)
    np.testing.assert_allclose(margins, np.log(p / (1 - p)), rtol=1e-5, atol=1e-5)


def test_one_minus_p_is_minus_dloss_dmargin():
    """L = -log p with p = sigmoid(margin), differentiated by jax.grad in the margin."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(20, 5)) * 2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, 20))
    margins = jax.vmap(classification_margin)(logits, labels)
    loss = lambda f: -jnp.log(jax.nn.sigmoid(f))
    # the loss of the margin is the cross-entropy of the logits
    ce = -jax.nn.log_softmax(logits)[jnp.arange(20), labels]
    np.testing.assert_allclose(jax.vmap(loss)(margins), ce, rtol=1e-5)
    np.testing.assert_allclose(one_minus_p(logits, labels), -jax.vmap(jax.grad(loss))(margins),
                               rtol=1e-5)


@pytest.mark.parametrize("logits,label,expected", [
    ([1e4, -1e4, 0.0], 0, 1e4),            # ±1e4 logits
    ([-1e4, 1e4, 0.0], 0, -2e4),
    ([30.0, 0.0, 0.0], 0, 30.0 - np.log(2)),   # one class dominates: p = 1 - 2e-13
])
def test_margin_finite_on_extreme_logits(logits, label, expected):
    logits = jnp.asarray(logits, jnp.float32)
    margin = classification_margin(logits, label)
    grad = jax.grad(classification_margin)(logits, label)
    assert np.isfinite(margin) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(margin, expected, rtol=1e-6)
    q = one_minus_p(logits[None], jnp.asarray([label]))
    assert np.isfinite(q).all()


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(2, 12),
                  elements=st.floats(-1e4, 1e4, width=32)), st.data())
def test_margin_and_q_against_float64_for_any_logits(logits, data):
    label = data.draw(st.integers(0, len(logits) - 1))
    g = logits.astype(np.float64)
    others = np.delete(g, label)
    expected_margin = g[label] - (others.max() + np.log(np.exp(others - others.max()).sum()))
    expected_q = np.exp(-np.logaddexp(0.0, expected_margin))      # 1 - sigmoid(margin)
    margin = classification_margin(jnp.asarray(logits), label)
    q = one_minus_p(jnp.asarray(logits)[None], jnp.asarray([label]))[0]
    assert np.isfinite(margin) and np.isfinite(q)
    # float32 resolves a log-sum-exp of logits of size |g| to about eps32 * |g|
    log_error = 1e-6 + 4 * np.finfo(np.float32).eps * np.abs(g).max()
    np.testing.assert_allclose(margin, expected_margin, rtol=1e-6, atol=log_error)
    np.testing.assert_allclose(q, expected_q, rtol=2 * log_error, atol=1e-37)


def test_one_minus_p_keeps_tiny_weights_of_confident_examples():
    """1 - p for p = 1 - 2e-13 is 2e-13, not the 0 that float32 1 - p would give."""
    q = one_minus_p(jnp.asarray([[30.0, 0.0, 0.0]]), jnp.asarray([0]))
    np.testing.assert_allclose(q, [2 * np.exp(-30.0)], rtol=1e-5)


def test_binary_signed_logit_and_labels():
    apply_fn = lambda p, x: x @ p
    params = jnp.asarray([1.0, -2.0])
    x = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    task = trax_attr.BinaryClassification()
    for labels in ([1, 0, 1], [True, False, True], [1.0, 0.0, 1.0]):
        labels = jnp.asarray(labels)
        f = jax.vmap(lambda *ex: task.get_output(apply_fn, params, *ex))(x, labels)
        np.testing.assert_allclose(f, [1.0, 2.0, -1.0])
        q = task.get_out_to_loss_grad(apply_fn, params, (x, labels))
        np.testing.assert_allclose(q, 1 - jax.nn.sigmoid(f), rtol=1e-6)


# --- registry ---------------------------------------------------------------------------
def test_unknown_task_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        trax_attr.get_task("segmentation")
    for name in trax_attr.TASKS:
        assert repr(name) in str(err.value)


def test_task_accepts_name_instance_subclass():
    assert trax_attr.get_task("image_classification") == trax_attr.ImageClassification()
    assert trax_attr.get_task("text_classification") == trax_attr.TextClassification()
    assert trax_attr.get_task("binary_classification") == trax_attr.BinaryClassification()
    assert trax_attr.get_task("causal_lm") == trax_attr.CausalLM()
    custom = trax_attr.ImageClassification(loss_temperature=2.0)
    assert trax_attr.get_task(custom) is custom
    assert trax_attr.get_task(trax_attr.CausalLM) == trax_attr.CausalLM()

    class Mine(trax_attr.ModelOutput):
        pass

    assert isinstance(trax_attr.get_task(Mine), Mine)
    with pytest.raises(TypeError, match="task must be"):
        trax_attr.get_task(3)
    with pytest.raises(TypeError, match=r"task=trax_attr.CLIP\(...\)"):
        trax_attr.get_task("clip")


def test_traker_accepts_task_forms(tmp_path):
    for i, task in enumerate(["image_classification", trax_attr.ImageClassification,
                              trax_attr.ImageClassification()]):
        traker = trax_attr.TRAKer(model=lambda p, x: x @ p, task=task, train_set_size=4,
                                  save_dir=tmp_path / str(i), projector="identity")
        assert traker.task == trax_attr.ImageClassification()


# --- CLIP --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_setup():
    params = tm.two_tower_init(0)
    images, texts, _ = tm.clip_batch(5, 16)
    bank = trax_attr.clip_embedding_bank(tm.two_tower_apply, params, images, texts,
                                         batch_size=6)
    return params, images, texts, bank


def test_clip_bank_is_the_models_embeddings(clip_setup):
    params, images, texts, bank = clip_setup
    u, v, _ = tm.two_tower_apply(params, images, texts)
    assert bank.image_embeddings.shape == (16, 8) and bank.image_embeddings.dtype == jnp.float32
    # the bank is computed in jitted batches of 6, the reference eagerly on all 16: float32
    # rounding differs by ~1e-7 of the scale (entries near 0 differ more relatively)
    for bank_part, eager in ((bank.image_embeddings, u), (bank.text_embeddings, v)):
        np.testing.assert_allclose(bank_part, eager, rtol=1e-6,
                                   atol=1e-6 * float(np.abs(eager).max()))


def test_clip_comparison_sets_are_uniform_over_the_bank(clip_setup):
    bank = clip_setup[3]
    task = trax_attr.CLIP(bank=bank, key=jax.random.key(0), num_compare=4)
    sets = np.asarray(jax.vmap(task.comparison_set)(jnp.arange(4000)))
    assert all(len(set(row)) == 4 for row in sets[:200])     # without replacement
    counts = np.bincount(sets.ravel(), minlength=16)
    assert counts.min() > 0                                   # index 0 too
    # 16000 draws over 16 indices: 1000 each; chi-square with 15 dof, p ≈ 1e-6 at 55
    chi2 = ((counts - 1000.0) ** 2 / 1000.0).sum()
    assert chi2 < 55, counts
    again = np.asarray(jax.vmap(task.comparison_set)(jnp.arange(10)))
    np.testing.assert_array_equal(again, sets[:10])           # same example, same set
    other = trax_attr.CLIP(bank=bank, key=jax.random.key(1), num_compare=4)
    assert not np.array_equal(np.asarray(jax.vmap(other.comparison_set)(jnp.arange(10))),
                              sets[:10])


def test_clip_output_with_the_whole_batch_as_bank(clip_setup):
    """n = N: f = log softmax(UVᵀ)_ii + log softmax(VUᵀ)_ii, the paper's in-batch form."""
    params, images, texts, bank = clip_setup
    task = trax_attr.CLIP(bank=bank, key=jax.random.key(0), num_compare=16)
    f = jax.vmap(lambda *ex: task.get_output(tm.two_tower_apply, params, *ex))(
        jnp.asarray(images), jnp.asarray(texts), jnp.arange(16))
    u, v = np.asarray(bank.image_embeddings, np.float64), np.asarray(bank.text_embeddings,
                                                                       np.float64)
    s = u @ v.T
    log_rows = s - np.log(np.exp(s).sum(1, keepdims=True))
    log_cols = s - np.log(np.exp(s).sum(0, keepdims=True))
    np.testing.assert_allclose(f, np.diag(log_rows) + np.diag(log_cols), rtol=1e-5, atol=1e-5)


def test_clip_rejects_bad_arguments(clip_setup):
    bank = clip_setup[3]
    with pytest.raises(ValueError, match="num_compare"):
        trax_attr.CLIP(bank=bank, key=jax.random.key(0), num_compare=17)
    with pytest.raises(TypeError, match="wrap_key_data"):
        trax_attr.CLIP(bank=bank, key=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="clip_embedding_bank"):
        trax_attr.CLIP(bank=(bank[0], bank[1]), key=jax.random.key(0))
    task = trax_attr.CLIP(bank=bank, key=jax.random.key(0), num_compare=8)
    two_outputs = lambda p, i, t: tm.two_tower_apply(p, i, t)[:2]
    with pytest.raises(ValueError, match="logit_scale"):
        task.get_out_to_loss_grad(two_outputs, clip_setup[0],
                                  (jnp.asarray(clip_setup[1]), jnp.asarray(clip_setup[2])))
    assert "16x8" in repr(task) and repr(task) == repr(
        trax_attr.CLIP(bank=bank, key=jax.random.key(0), num_compare=8))


# --- causal LM ---------------------------------------------------------------------------
def test_target_weights_follow_masks():
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])   # right and left padding
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(trax_attr.tasks.target_weights(mask),
                                  [[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(trax_attr.tasks.target_weights(mask, loss_mask),
                                  [[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]])


def test_causal_lm_ignores_padding_tokens():
    model = trax_attr.nnx_model(tm.build(tm.Decoder))
    params, state = model.split(None)
    apply_fn = lambda p, *x: model.apply(p, state, *x)
    ids, mask = (jnp.asarray(a) for a in tm.lm_batch(3, 2))
    noisy = jnp.where(mask == 1, ids, 7)                     # other tokens in the padding
    task = trax_attr.CausalLM()
    f = jax.jit(jax.vmap(lambda *ex: task.get_output(apply_fn, params, *ex)))
    q = jax.jit(lambda *b: task.get_out_to_loss_grad(apply_fn, params, b))
    np.testing.assert_allclose(f(ids, mask), f(noisy, mask), rtol=1e-6)
    np.testing.assert_allclose(q(ids, mask), q(noisy, mask), rtol=1e-6)
    empty = jnp.zeros_like(mask).at[:, 0].set(1)               # one token: no target
    np.testing.assert_array_equal(f(ids, empty), 0.0)
    np.testing.assert_array_equal(q(ids, empty), 0.0)
