"""The linear model of the tests' shared problems (tests/conftest.py trains its checkpoints).

A module of its own, not conftest: tests/zoo has a conftest too, and ``from conftest import``
would resolve to whichever of the two pytest imported first."""


def linear_apply(params, x):
    """``(B, 64) -> (B, 10)`` logits of ``{"w": (64, 10), "b": (10,)}``."""
    return x @ params["w"] + params["b"]
