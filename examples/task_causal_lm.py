"""TRAK for a causal language model: a tiny Flax decoder on two generated "languages".

Run: python examples/task_causal_lm.py   (under 10 s on 2 cores)

Half the sequences count up by 1 (mod V), half by 3. A sequence's output is the sum of its
next-token margins (trax_attr.CausalLM); the first two tokens are a prompt, excluded from
the targets by a loss mask. Prints for how many target sequences the training sequences
of the same language score higher on average.
"""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import trax_attr

VOCAB, LENGTH = 17, 8


class TinyDecoder(nnx.Module):
    """Each position sees its token and the previous one: (B, T) -> (B, T, V) logits."""

    def __init__(self, dim=16, *, rngs: nnx.Rngs):
        self.tok = nnx.Embed(VOCAB, dim, rngs=rngs)
        self.prev = nnx.Embed(VOCAB + 1, dim, rngs=rngs)   # index VOCAB: no previous token
        self.head = nnx.Linear(dim, VOCAB, rngs=rngs)

    def __call__(self, input_ids, attention_mask):
        previous = jnp.concatenate(
            [jnp.full_like(input_ids[:, :1], VOCAB), input_ids[:, :-1]], axis=1)
        x = jax.nn.gelu(self.tok(input_ids) + self.prev(previous))
        return self.head(x * attention_mask[..., None])


def sequences(seed, n):
    rng = np.random.default_rng(seed)
    language = rng.integers(0, 2, n)
    steps = np.where(language == 1, 3, 1)
    ids = (rng.integers(0, VOCAB, n)[:, None] + steps[:, None] * np.arange(LENGTH)) % VOCAB
    mask = np.ones((n, LENGTH), np.int32)
    loss_mask = np.broadcast_to(np.arange(LENGTH) >= 2, (n, LENGTH)).astype(np.int32)
    return (ids.astype(np.int32), mask, loss_mask), language


def train(model, batch, steps=200):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, mask, loss_mask = batch
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(ids, mask)[:, :-1]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
            return (ce * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        updates, state = opt.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    nnx.update(model, params)
    return model


def main():
    (train_set, train_lang), (test_set, test_lang) = sequences(0, 300), sequences(1, 20)
    model = train(TinyDecoder(rngs=nnx.Rngs(0)), train_set)
    with tempfile.TemporaryDirectory() as save_dir:
        traker = trax_attr.TRAKer(model=model, task="causal_lm", train_set_size=300,
                                  save_dir=save_dir, proj_dim=256)
        traker.load_checkpoint(nnx.state(model), model_id=0)
        for start in range(0, 300, 100):
            traker.featurize(batch=tuple(a[start:start + 100] for a in train_set),
                             num_samples=100)
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=nnx.state(model),
                                        model_id=0, num_targets=20)
        traker.score(batch=test_set, num_samples=20)
        scores = traker.finalize_scores(exp_name="test")      # (300, 20)

    same = train_lang[:, None] == test_lang[None, :]
    gap = (scores * same).sum(0) / same.sum(0) - (scores * ~same).sum(0) / (~same).sum(0)
    agreement = float((gap > 0).mean())
    print(f"scores {scores.shape}; same-language training sequences score higher on average "
          f"for {agreement:.0%} of targets")
    return agreement


if __name__ == "__main__":
    main()
