"""open_clip's CLIP, as open_clip builds it, for the CLIP task.

open_clip's forward(image, text) returns (image_features, text_features, logit_scale.exp()),
the CLIP task's order, so it is called as it is. Its text tower keeps the causal mask as a
non-persistent buffer (``attn_mask``), which a state_dict does not hold: it comes from the
module. The one-line call on backend="torch" equals traker 0.3.2's CLIP task without
projection; backend="converted" agrees with it.
"""

import jax
import numpy as np
import pytest
import torch

import trax_attr
import zoo_models as zoo
from trax_attr import interop

pytest.importorskip("open_clip", reason="needs open_clip_torch (the zoo extra; docs/models.md)")

N_TRAIN, N_TARGETS, N_BANK = 8, 4, 12


@pytest.fixture(scope="module")
def model():
    return zoo.open_clip_model()


@pytest.fixture(scope="module")
def bank_pairs():
    return zoo.clip_pairs(9, N_BANK)


def task_of(model, pairs, drop_first=False, backend="torch"):
    """The CLIP task on a bank of ``pairs``; ``drop_first``: without the bank's first pair
    (traker's sampler never draws index 0, see tasks/clip.py), comparing with all the rest."""
    images, texts, _ = pairs
    if drop_first:
        images, texts = images[1:], texts[1:]
    bank = trax_attr.clip_embedding_bank(model, None, images, texts, backend=backend)
    return trax_attr.CLIP(bank=bank, key=jax.random.key(0), num_compare=len(images))


def test_state_holds_the_non_persistent_mask(model):
    assert "attn_mask" not in model.state_dict()
    params, state = trax_attr.as_model(model, backend="torch").split(model.state_dict())
    np.testing.assert_array_equal(np.asarray(state["attn_mask"]), model.attn_mask.numpy())
    assert "logit_scale" in params


@pytest.fixture(scope="module")
def torch_scores(model, bank_pairs, tmp_path_factory):
    train, targets = zoo.clip_pairs(0, N_TRAIN), zoo.clip_pairs(1, N_TARGETS)
    return zoo.trak(model, task_of(model, bank_pairs), train, targets,
                    tmp_path_factory.mktemp("open_clip"), backend="torch", proj_dim=256,
                    batch_size=N_TARGETS)


def test_torch_route(torch_scores):
    assert torch_scores.shape == (N_TRAIN, N_TARGETS)
    assert np.isfinite(torch_scores).all() and np.abs(torch_scores).max() > 0


def test_converted_route_agrees(model, bank_pairs, torch_scores, tmp_path):
    train, targets = zoo.clip_pairs(0, N_TRAIN), zoo.clip_pairs(1, N_TARGETS)
    converted = interop.torch_model(model, "converted")
    scores = zoo.trak(
        converted, task_of(model, bank_pairs, backend="converted"), train, targets,
        tmp_path, proj_dim=256, batch_size=N_TARGETS)
    zoo.assert_pearson(scores, torch_scores, what="open_clip converted vs torch")
    zoo.assert_converted_outputs(converted, model, targets[:2])


def test_matches_traker_without_projection(model, bank_pairs, tmp_path):
    """traker draws each comparison set from its bank without index 0 (multinomial weights
    arange(N)); with N - 1 of them the set is exactly pairs 1..N-1, which is our set when
    our bank is those pairs and num_compare is all of them."""
    from trak.modelout_functions import CLIPModelOutput

    train, targets = zoo.clip_pairs(0, N_TRAIN), zoo.clip_pairs(1, N_TARGETS)
    images, texts, _ = bank_pairs
    with torch.no_grad():
        u, v, _ = model(torch.from_numpy(images), torch.from_numpy(texts).long())
    class ReferenceCLIP(CLIPModelOutput):
        """traker 0.3.2's CLIP task returns Q of shape (B,), which its store (B, 1) refuses
        ("could not be broadcast"); its other tasks return (B, 1)."""

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return super().get_out_to_loss_grad(model, weights, buffers, batch)[:, None]

    reference_task = ReferenceCLIP(simulated_batch_size=N_BANK - 1)
    # get_embeddings puts the bank on CUDA; CPU runs set it directly
    CLIPModelOutput.image_embeddings, CLIPModelOutput.text_embeddings = u, v
    CLIPModelOutput.num_computed_embeddings = N_BANK
    names = ["visual.proj", "text_projection"]
    # Q depends on the other examples of the training batch: both featurize 4 at a time
    want = zoo.traker_scores(model, reference_task, train[:2], targets[:2], tmp_path / "trak",
                             grad_wrt=names, batch_size=N_TARGETS)
    got = zoo.ours_like_traker(model, task_of(model, bank_pairs, drop_first=True), train,
                               targets, tmp_path / "ours", grad_wrt=names,
                               batch_size=N_TARGETS)
    zoo.assert_traker_parity(got, want, "open_clip, backend=torch")
