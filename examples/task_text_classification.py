"""TRAK for text classification: a tiny Flax nnx text classifier on generated sentences.

Run: python examples/task_text_classification.py   (under 10 s on 2 cores)

Sentences are random tokens; the label is which of three "topic" token ranges the
sentence draws most of its tokens from. Examples are (input_ids, token_type_ids,
attention_mask, label), the layout of BERT and of trax_attr.TextClassification. Prints
for how many targets the same-topic training sentences score higher on average.
"""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import trax_attr

VOCAB, LENGTH, CLASSES = 60, 10, 3


class BagClassifier(nnx.Module):
    """Masked mean of token (+ segment) embeddings -> MLP -> (B, C) logits."""

    def __init__(self, dim=16, *, rngs: nnx.Rngs):
        self.tok = nnx.Embed(VOCAB, dim, rngs=rngs)
        self.typ = nnx.Embed(2, dim, rngs=rngs)
        self.hidden = nnx.Linear(dim, dim, rngs=rngs)
        self.head = nnx.Linear(dim, CLASSES, rngs=rngs)

    def __call__(self, input_ids, token_type_ids, attention_mask):
        mask = attention_mask[..., None].astype(jnp.float32)
        x = (self.tok(input_ids) + self.typ(token_type_ids)) * mask
        pooled = x.sum(1) / jnp.maximum(mask.sum(1), 1.0)
        return self.head(jax.nn.gelu(self.hidden(pooled)))


def sentences(seed, n):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    topic = rng.integers(0, 20, (n, LENGTH)) + 20 * labels[:, None]
    noise = rng.integers(0, VOCAB, (n, LENGTH))
    ids = np.where(rng.random((n, LENGTH)) < 0.6, topic, noise).astype(np.int32)
    lengths = rng.integers(4, LENGTH + 1, n)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    types = np.zeros_like(ids)
    return ids * mask, types, mask, labels


def train(model, batch, steps=150):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    *inputs, labels = batch
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(*inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        updates, state = opt.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    nnx.update(model, params)
    return model


def main():
    train_set, test_set = sentences(0, 400), sentences(1, 30)
    model = train(BagClassifier(rngs=nnx.Rngs(0)), train_set)
    with tempfile.TemporaryDirectory() as save_dir:
        traker = trax_attr.TRAKer(model=model, task="text_classification",
                                  train_set_size=400, save_dir=save_dir, proj_dim=256)
        traker.load_checkpoint(nnx.state(model), model_id=0)
        for start in range(0, 400, 100):
            traker.featurize(batch=tuple(a[start:start + 100] for a in train_set),
                             num_samples=100)
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=nnx.state(model),
                                        model_id=0, num_targets=30)
        traker.score(batch=test_set, num_samples=30)
        scores = traker.finalize_scores(exp_name="test")      # (400, 30)

    same = train_set[3][:, None] == test_set[3][None, :]
    gap = (scores * same).sum(0) / same.sum(0) - (scores * ~same).sum(0) / (~same).sum(0)
    agreement = float((gap > 0).mean())
    print(f"scores {scores.shape}; same-topic training sentences score higher on average "
          f"for {agreement:.0%} of targets")
    return agreement


if __name__ == "__main__":
    main()
