"""One suite every task passes: the contract of trax_attr.ModelOutput.

For each built-in task, on a small model written in tests/task_models.py:
scalar output; finite output, out-to-loss and gradients when the logits are ±1e4; vmap
equals a Python loop; jit equals eager; no retrace on a second batch of the same shape; and
Q = -∂L/∂f, with L the training loss written as a function of the output, independently
of the task's code, and checked against the loss computed directly from the logits.
"""

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import trax_attr
import task_models as tm

B = 4


class Case(NamedTuple):
    task: trax_attr.ModelOutput
    apply_fn: Callable
    params: Any
    batches: tuple          # two batches of B examples, same shapes, different values
    amplify: Callable       # (model output, factor) -> output with logits scaled by factor
    logits: Callable        # model output -> the logit-like array whose size we control
    loss_view: Callable     # (apply_fn, params, batch) -> (f (B,), loss(f, *aux), aux, direct (B,))
    output_is_f: bool       # the task's get_output is the f of loss_view
    n_inputs: int           # the first n_inputs arrays of a batch are the model's inputs


def margins_from_logits(logits, labels):
    """log(p / (1 - p)) of the labelled class via log-softmax: independent of the library."""
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[..., None], -1)[..., 0]
    return logp - jnp.log(-jnp.expm1(logp))


def classification_view(apply_fn, params, batch):
    *inputs, labels = batch
    logits = apply_fn(params, *inputs)
    f = margins_from_logits(logits, labels)
    direct = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return f, lambda f: jax.nn.softplus(-f), (), direct


def binary_view(apply_fn, params, batch):
    x, labels = batch
    logits = apply_fn(params, x).reshape(-1)
    f = jnp.where(labels == 1, logits, -logits)
    direct = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
    return f, lambda f: jax.nn.softplus(-f), (), direct


def causal_lm_view(apply_fn, params, batch):
    ids, mask, *rest = batch
    logits = apply_fn(params, ids, mask)[:, :-1]
    targets = ids[:, 1:]
    w = (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32)
    if rest:
        w = w * rest[0][:, 1:]
    m = margins_from_logits(logits, targets)                           # (B, T-1)
    f = jnp.sum(w * m, -1)
    direct = jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, targets), -1)

    def loss(f, m, w):  # every target margin takes an equal share of a change of f
        shift = (f - jnp.sum(w * m)) / jnp.maximum(jnp.sum(w), 1.0)
        return jnp.sum(w * jax.nn.softplus(-(m + shift)))

    return f, loss, (m, w), direct


def clip_view(apply_fn, params, batch):
    images, texts = batch[0], batch[1]
    u, v, scale = apply_fn(params, images, texts)
    sims = scale * u @ v.T
    diag = jnp.arange(len(sims))
    m_img, m_txt = margins_from_logits(sims, diag), margins_from_logits(sims.T, diag)
    direct = (optax.softmax_cross_entropy_with_integer_labels(sims, diag)
              + optax.softmax_cross_entropy_with_integer_labels(sims.T, diag))

    def loss(f, m_img, m_txt):  # both directions take half of a change of f
        shift = (f - m_img - m_txt) / 2
        return jax.nn.softplus(-(m_img + shift)) + jax.nn.softplus(-(m_txt + shift))

    return m_img + m_txt, loss, (m_img, m_txt), direct


def scale_logits(out, factor):
    return out * factor


def nnx_apply(module):
    model = trax_attr.nnx_model(module)
    params, state = model.split(None)
    return (lambda p, *inputs: model.apply(p, state, *inputs)), params


def make_cases(digits):
    x, y = digits
    rng = np.random.default_rng(0)
    cases = {}

    w = {"w": jnp.asarray(rng.normal(size=(64, 10)), jnp.float32) * 0.3, "b": jnp.zeros(10)}
    cases["image_classification"] = Case(
        trax_attr.ImageClassification(), lambda p, x: x @ p["w"] + p["b"], w,
        ((x[:B], y[:B]), (x[B:2 * B], y[B:2 * B])), scale_logits, lambda o: o,
        classification_view, True, 1)

    mlp = {"w1": jnp.asarray(rng.normal(size=(64, 8)), jnp.float32) * 0.3,
           "w2": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
    binary_y = (y % 2).astype(np.int32)
    cases["binary_classification"] = Case(
        trax_attr.BinaryClassification(), lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"], mlp,
        ((x[:B], binary_y[:B]), (x[B:2 * B], binary_y[B:2 * B])), scale_logits, lambda o: o,
        binary_view, True, 1)

    apply_fn, params = nnx_apply(tm.build(tm.EncoderClassifier))
    cases["text_classification"] = Case(
        trax_attr.TextClassification(), apply_fn, params,
        (tm.text_batch(1, B), tm.text_batch(2, B)), scale_logits, lambda o: o,
        classification_view, True, 3)

    apply_fn, params = nnx_apply(tm.build(tm.Decoder))
    cases["causal_lm"] = Case(
        trax_attr.CausalLM(), apply_fn, params,
        (tm.lm_batch(1, B, with_loss_mask=True), tm.lm_batch(2, B, with_loss_mask=True)),
        scale_logits, lambda o: o, causal_lm_view, True, 2)

    params = tm.two_tower_init(0)
    bank_data = tm.clip_batch(9, 24)
    bank = trax_attr.clip_embedding_bank(tm.two_tower_apply, params, *bank_data[:2],
                                         batch_size=10)
    cases["clip"] = Case(
        trax_attr.CLIP(bank=bank, key=jax.random.key(3), num_compare=8),
        tm.two_tower_apply, params, (tm.clip_batch(1, B), tm.clip_batch(2, B)),
        lambda o, a: (o[0] * np.sqrt(a), o[1] * np.sqrt(a), o[2]),
        lambda o: o[0] @ o[1].T, clip_view, False, 2)
    return cases


CASES = ["image_classification", "binary_classification", "text_classification",
         "causal_lm", "clip"]


@pytest.fixture(scope="module")
def cases(digits):
    return make_cases(digits)


@pytest.fixture(params=CASES)
def case(request, cases) -> Case:
    return cases[request.param]


def batched_output(case: Case, apply_fn=None):
    """(params, batch) -> (B,) outputs, the task's one-example output under vmap."""
    apply_fn = apply_fn or case.apply_fn
    return lambda p, batch: jax.vmap(lambda *ex: case.task.get_output(apply_fn, p, *ex))(*batch)


def features_fn(case: Case, apply_fn=None):
    """(params, batch) -> (outputs (B,), per-example grads, Q (B,)): what TRAK computes."""
    apply_fn = apply_fn or case.apply_fn

    def features(params, batch):
        one = lambda p, ex: case.task.get_output(apply_fn, p, *ex)
        outputs, grads = jax.vmap(jax.value_and_grad(one), in_axes=(None, 0))(params, batch)
        return outputs, grads, case.task.get_out_to_loss_grad(apply_fn, params, batch)

    return features


_JITTED = {}


def jitted(case: Case):
    """(jit(batched outputs), jit(Q)) of a case, compiled once for all the tests below."""
    key = id(case)
    if key not in _JITTED:
        _JITTED[key] = (jax.jit(batched_output(case)), jax.jit(
            lambda p, b: case.task.get_out_to_loss_grad(case.apply_fn, p, b)))
    return _JITTED[key]


def as_jnp(batch):
    return tuple(jnp.asarray(a) for a in batch)


def test_every_builtin_is_covered():
    """A task added to the registry without a case here fails this test."""
    assert set(trax_attr.TASKS.values()) == {
        trax_attr.ImageClassification, trax_attr.BinaryClassification,
        trax_attr.TextClassification, trax_attr.CausalLM, trax_attr.CLIP}
    assert {type(trax_attr.TASKS[name]) for name in CASES} == {type}
    assert {trax_attr.TASKS[name] for name in CASES} == set(trax_attr.TASKS.values())


def test_scalar_output_and_no_retrace_on_second_batch(case):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def features(params, batch):
        return features_fn(case)(params, batch)

    first = features(case.params, as_jnp(case.batches[0]))
    second = features(case.params, as_jnp(case.batches[1]))  # raises if traced again
    assert not np.allclose(first[2], second[2])  # the second batch really is different
    example = tuple(jnp.asarray(a[0]) for a in case.batches[0])
    out = jax.jit(lambda p, ex: case.task.get_output(case.apply_fn, p, *ex))(case.params, example)
    assert out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)
    assert first[0].shape == (B,) and first[2].shape == (B,)
    assert jnp.issubdtype(first[2].dtype, jnp.floating)


def test_finite_on_extreme_logits(case):
    batch = as_jnp(case.batches[0])
    model_inputs = batch[:case.n_inputs]
    base = np.abs(np.asarray(case.logits(case.apply_fn(case.params, *model_inputs)))).max()
    factor = 1e4 / base

    def loud(p, *inputs):
        return case.amplify(case.apply_fn(p, *inputs), factor)

    assert np.abs(np.asarray(case.logits(loud(case.params, *model_inputs)))).max() >= 9e3
    outputs, grads, q = jax.jit(features_fn(case, loud))(case.params, batch)
    assert np.all(np.isfinite(outputs)) and np.abs(np.asarray(outputs)).max() > 100
    assert np.all(np.isfinite(q)) and np.all(np.asarray(q) >= 0)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_vmap_equals_loop(case):
    batch = as_jnp(case.batches[0])
    vmapped = jitted(case)[0](case.params, batch)
    one = jax.jit(lambda p, ex: case.task.get_output(case.apply_fn, p, *ex))
    looped = [one(case.params, tuple(a[i] for a in batch)) for i in range(B)]
    np.testing.assert_allclose(vmapped, np.stack(looped), rtol=1e-5, atol=1e-5)


def test_jit_equals_eager(case):
    batch = as_jnp(case.batches[0])
    q_fn = lambda p, b: case.task.get_out_to_loss_grad(case.apply_fn, p, b)
    # op by op, outside jit (eager gradients would only be slower)
    eager = (batched_output(case)(case.params, batch), q_fn(case.params, batch))
    compiled = (jitted(case)[0](case.params, batch), jitted(case)[1](case.params, batch))
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-5, atol=1e-7)


def test_out_to_loss_is_minus_dloss_doutput(case):
    batch = as_jnp(case.batches[0])
    f, loss_of_output, aux, direct = case.loss_view(case.apply_fn, case.params, batch)
    # the loss written as a function of f is the training loss
    np.testing.assert_allclose(jax.vmap(loss_of_output)(f, *aux), direct, rtol=1e-5, atol=1e-6)
    expected = -jax.vmap(jax.grad(loss_of_output))(f, *aux)
    q = jitted(case)[1](case.params, batch)
    assert np.all(np.asarray(q) > 0)
    np.testing.assert_allclose(q, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        trax_attr.out_to_loss_from_loss(loss_of_output, f, *aux), expected, rtol=1e-6)
    if case.output_is_f:
        np.testing.assert_allclose(jitted(case)[0](case.params, batch), f,
                                   rtol=1e-5, atol=1e-5)
