"""The zoo's tiny models (built from configs, random weights, no downloads), their data,
and the runs every zoo test shares: the one-line TRAKer call and traker 0.3.2 as the reference.

Imported by the zoo's test modules after tests/zoo/conftest.py has made torchvision
importable.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import trax_attr
from trax_attr import interop

# The λ of every comparison: features of random-init models at n < d need a ridge, and a
# fixed explicit one is what traker and both routes are run with.
LAMBDA = 0.1


# --- models --------------------------------------------------------------------------------
# Transformers of one layer (32 wide) in the tests: every op of a block is there, and the
# converted route's export and compilation cost half of two layers'. benchmarks/zoo.py
# measures them with layers=2.

def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def bert(layers: int = 1) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def gpt2(layers: int = 1) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=layers,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def hf_clip(layers: int = 1) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=2,
                         max_position_embeddings=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=16)
    return transformers.CLIPModel(config).eval()


def open_clip_model(layers: int = 1) -> nn.Module:
    import open_clip

    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=layers, width=32, head_width=16,
                                                 patch_size=8, image_size=16),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32,
                                             heads=2, layers=layers)).eval()


# --- data ----------------------------------------------------------------------------------

def images(seed: int, n: int, size: int = 16, classes: int = 10):
    """(images (n, 3, size, size) f32, labels (n,) i32)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3, size, size)).astype(np.float32),
            rng.integers(0, classes, n).astype(np.int32))


def text(seed: int, n: int, length: int = 12, vocab: int = 64, classes: int = 3):
    """(input_ids, attention_mask, token_type_ids, labels), HF's order; right-padded i32."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (n, length)).astype(np.int32)
    lengths = rng.integers(4, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    types = ((np.arange(length)[None] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
    return ids * mask, mask, types, rng.integers(0, classes, n).astype(np.int32)


def clip_pairs(seed: int, n: int, start: int = 0, length: int = 8, vocab: int = 64):
    """(images (n, 3, 16, 16) f32, texts (n, length) i32, index (n,) i32 from ``start``)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3, 16, 16)).astype(np.float32),
            rng.integers(1, vocab, (n, length)).astype(np.int32),
            np.arange(start, start + n, dtype=np.int32))


# --- runs ----------------------------------------------------------------------------------

def trak(model, task, train, targets, save_dir, *, checkpoint=None, batch_size=None,
         **kwargs) -> np.ndarray:
    """The one-line TRAKer call and traker's loop: ``(n, m)`` scores, float32 compute, the
    explicit λ."""
    n, m = len(train[0]), len(targets[0])
    kwargs = {"proj_dtype": jnp.float32, "lambda_reg": LAMBDA, **kwargs}
    traker = trax_attr.TRAKer(model=model, task=task, train_set_size=n, save_dir=save_dir,
                              **kwargs)
    traker.load_checkpoint(checkpoint, model_id=0)
    size = batch_size or n
    for start in range(0, n, size):
        traker.featurize(batch=tuple(a[start:start + size] for a in train),
                         num_samples=min(size, n - start))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="t", checkpoint=checkpoint, model_id=0,
                                    num_targets=m)
    traker.score(batch=targets, num_samples=m)
    return np.asarray(traker.finalize_scores(exp_name="t"))


def assert_pearson(got, want, threshold: float = 0.999, what: str = "") -> np.ndarray:
    """Per-target Pearson correlation of two ``(n, m)`` score matrices above ``threshold``."""
    agreement = interop.compare(got, want, k=min(10, len(want)))
    print(f"{what}\n{agreement}")
    assert np.all(agreement.pearson > threshold), (what, agreement.pearson)
    return agreement.pearson


def assert_converted_outputs(converted, module, inputs, rtol: float = 1e-4) -> None:
    """The converted function's outputs on ``inputs`` equal the module's run by torch (the
    torch route's apply, which calls it as the tasks do), leaf by leaf. Called with a batch
    of the size featurized, so the exported program is the one already made (jitted: one
    compilation of the forward, not one per op)."""
    import jax

    params, state = converted.split(None)
    got = jax.jit(converted.apply)(params, state, *inputs)
    want = interop.torch_model(module, "torch").apply(params, state, *inputs)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=rtol * np.abs(b).max())


def only_parameters(module: nn.Module, names) -> nn.Module:
    """A copy of ``module`` whose parameters other than ``names`` are buffers: the same
    function, but traker (which differentiates every parameter, then keeps its
    ``grad_wrt``) differentiates only ``names``, so the reference runs in seconds."""
    import copy

    frozen = copy.deepcopy(module)
    for prefix, sub in frozen.named_modules():
        for name, param in list(sub._parameters.items()):
            full = f"{prefix}.{name}" if prefix else name
            if param is not None and full not in names:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach())
    return frozen


def traker_scores(model, task, train, targets, save_dir, *, grad_wrt, batch_size=None):
    """traker 0.3.2 without projection (NoOpProjector), float32 on CPU, the same λ; only
    the ``grad_wrt`` parameters are differentiated (:func:`only_parameters`)."""
    trak = pytest.importorskip("trak", reason="traker==0.3.2 is the reference "
                               "(pip install 'trax_attr[test]')")
    from trak.projectors import NoOpProjector

    n, m = len(train[0]), len(targets[0])
    model = only_parameters(model, grad_wrt)
    reference = trak.TRAKer(model=model, task=task, train_set_size=n, save_dir=str(save_dir),
                            device="cpu", use_half_precision=False, lambda_reg=LAMBDA,
                            projector=NoOpProjector(device="cpu"), grad_wrt=grad_wrt,
                            logging_level=logging.ERROR)
    checkpoint = model.state_dict()
    reference.load_checkpoint(checkpoint, model_id=0)
    as_torch = lambda arrays: tuple(torch.from_numpy(np.asarray(a)).long()  # noqa: E731
                                    if np.issubdtype(np.asarray(a).dtype, np.integer)
                                    else torch.from_numpy(np.asarray(a)) for a in arrays)
    size = batch_size or n
    for start in range(0, n, size):
        reference.featurize(batch=as_torch(a[start:start + size] for a in train),
                            num_samples=min(size, n - start))
    reference.finalize_features()
    reference.start_scoring_checkpoint(exp_name="t", checkpoint=checkpoint, model_id=0,
                                       num_targets=m)
    reference.score(batch=as_torch(targets), num_samples=m)
    return np.asarray(reference.finalize_scores(exp_name="t"))


def ours_like_traker(model, task, train, targets, save_dir, *, grad_wrt, **kwargs):
    """Our side of a traker parity run: identity projector, traker's inverse rescaling."""
    return trak(model, task, train, targets, save_dir, projector="identity",
                traker_inverse_rescale=True, grad_wrt=grad_wrt, backend="torch", **kwargs)


def assert_traker_parity(got, want, what: str) -> None:
    print(f"{what} vs traker 0.3.2 (NoOpProjector):\n"
          f"{interop.compare(got, want, k=min(10, len(want)))}")
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
