"""torchvision's resnet18, as torchvision builds it, for image classification.

The one-line call on backend="torch" (the module run by torch, the JAX task
differentiating through it) and on backend="converted"; both routes' scores agree, and
without projection they equal traker 0.3.2's.
"""

import numpy as np
import pytest

import zoo_models as zoo
from trax_attr import interop

pytest.importorskip("torchvision", reason="needs torchvision (the zoo extra; docs/models.md)")

N_TRAIN, N_TARGETS = 8, 4  # featurized 4 at a time: one batch shape, one compilation
# BatchNorm of the last stage and the head: gradients flow back through the deep layers,
# and d (9,226) keeps the zoo fast.
GRAD_WRT = ["layer4.*.bn*", "fc.*"]


@pytest.fixture(scope="module")
def resnet():
    return zoo.resnet18()


@pytest.fixture(scope="module")
def data():
    return zoo.images(0, N_TRAIN), zoo.images(1, N_TARGETS)


@pytest.fixture(scope="module")
def torch_scores(resnet, data, tmp_path_factory):
    train, targets = data
    return zoo.trak(resnet, "image_classification", train, targets,
                    tmp_path_factory.mktemp("resnet_torch"), backend="torch", proj_dim=256,
                    grad_wrt=GRAD_WRT, batch_size=N_TARGETS)


def test_torch_route(torch_scores):
    assert torch_scores.shape == (N_TRAIN, N_TARGETS)
    assert np.isfinite(torch_scores).all() and np.abs(torch_scores).max() > 0


def test_converted_route_agrees(resnet, data, torch_scores, tmp_path):
    train, targets = data
    model = interop.torch_model(resnet, "converted")
    scores = zoo.trak(
        model, "image_classification", train, targets, tmp_path, proj_dim=256,
        grad_wrt=GRAD_WRT, batch_size=N_TARGETS)
    zoo.assert_pearson(scores, torch_scores, what="resnet18 converted vs torch")
    zoo.assert_converted_outputs(model, resnet, targets[:1])


def test_matches_traker_without_projection(resnet, data, tmp_path):
    train, targets = data
    # the last BatchNorm and the head's bias: d = 1,034, so both sides' (XᵀX + λI)⁻¹ is small
    names = ["layer4.1.bn2.weight", "layer4.1.bn2.bias", "fc.bias"]
    want = zoo.traker_scores(resnet, "image_classification", train, targets,
                             tmp_path / "trak", grad_wrt=names)
    got = zoo.ours_like_traker(resnet, "image_classification", train, targets,
                               tmp_path / "ours", grad_wrt=names, batch_size=N_TARGETS)
    zoo.assert_traker_parity(got, want, "resnet18, backend=torch")
