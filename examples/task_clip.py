"""TRAK for CLIP: a two-tower model on generated image-caption pairs.

Run: python examples/task_clip.py   (under 10 s on 2 cores)

Each pair has a hidden concept (5 of them): the "image" is the concept's prototype plus
noise, the "caption" holds the concept's word among random words. The model output
compares a pair with 32 pairs sampled from a bank of embeddings computed once by
trax_attr.clip_embedding_bank (trax_attr.CLIP). Examples are (image, text, index): the
index seeds the example's comparison set. Prints for how many target pairs the training
pairs of the same concept score higher on average.
"""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import trax_attr

CONCEPTS, IMAGE_DIM, VOCAB, WORDS, DIM = 5, 16, 40, 4, 8


def apply_fn(params, images, texts):
    """-> (image_embeddings (B, D), text_embeddings (B, D), logit_scale ()), unit norm."""
    u = images @ params["image"]
    v = params["words"][texts].mean(axis=1) @ params["text"]
    normalize = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    return normalize(u), normalize(v), jnp.exp(params["log_scale"])


def pairs(seed, n):
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(123).normal(size=(CONCEPTS, IMAGE_DIM))
    concept = rng.integers(0, CONCEPTS, n)
    images = (prototypes[concept] + 0.8 * rng.normal(size=(n, IMAGE_DIM))).astype(np.float32)
    texts = rng.integers(CONCEPTS, VOCAB, (n, WORDS))
    texts[np.arange(n), rng.integers(0, WORDS, n)] = concept     # the concept's word
    return images, texts.astype(np.int32), concept


def train(images, texts, steps=300):
    images, texts = jnp.asarray(images), jnp.asarray(texts)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"image": 0.3 * jax.random.normal(k1, (IMAGE_DIM, DIM)),
              "words": 0.3 * jax.random.normal(k2, (VOCAB, DIM)),
              "text": 0.3 * jax.random.normal(k3, (DIM, DIM)),
              "log_scale": jnp.log(jnp.float32(10.0))}
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state, idx):
        def loss(p):
            u, v, scale = apply_fn(p, images[idx], texts[idx])
            sims = scale * u @ v.T
            diag = jnp.arange(len(idx))
            return (optax.softmax_cross_entropy_with_integer_labels(sims, diag).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(sims.T, diag).mean())
        updates, state = opt.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(0)
    for _ in range(steps):
        params, state = step(params, state, rng.choice(len(images), 64, replace=False))
    return params


def main():
    train_images, train_texts, train_concept = pairs(0, 300)
    test_images, test_texts, test_concept = pairs(1, 20)
    params = train(train_images, train_texts)
    # computed once per checkpoint, before featurizing
    bank = trax_attr.clip_embedding_bank(apply_fn, params, train_images, train_texts)
    task = trax_attr.CLIP(bank=bank, key=jax.random.key(0), num_compare=32)

    order = np.random.default_rng(1).permutation(300)  # in-batch Q wants shuffled batches
    with tempfile.TemporaryDirectory() as save_dir:
        traker = trax_attr.TRAKer(model=apply_fn, task=task, train_set_size=300,
                                  save_dir=save_dir, proj_dim=256)
        traker.load_checkpoint(params, model_id=0)
        for start in range(0, 300, 100):
            rows = order[start:start + 100]
            traker.featurize(batch=(train_images[rows], train_texts[rows], rows.astype(np.int32)),
                             inds=rows)
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=0,
                                        num_targets=20)
        # target ids continue after the training ids: their own comparison sets
        traker.score(batch=(test_images, test_texts, np.arange(300, 320, dtype=np.int32)),
                     num_samples=20)
        scores = traker.finalize_scores(exp_name="test")      # (300, 20)

    same = train_concept[:, None] == test_concept[None, :]
    gap = (scores * same).sum(0) / same.sum(0) - (scores * ~same).sum(0) / (~same).sum(0)
    agreement = float((gap > 0).mean())
    print(f"scores {scores.shape}; same-concept training pairs score higher on average "
          f"for {agreement:.0%} of targets")
    return agreement


if __name__ == "__main__":
    main()
