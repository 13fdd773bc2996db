"""Tasks: what TRAK attributes (the model output f) and how the loss responds to it (Q).

* :mod:`.base`: the :class:`ModelOutput` interface and :func:`out_to_loss_from_loss`;
* :mod:`.classification`: image, text and binary (single-logit) classification;
* :mod:`.clip`: CLIP's contrastive output against an embedding bank;
* :mod:`.language`: causal language modelling (a sequence's next-token margins).

``TASKS`` maps the names accepted by ``TRAKer(task=...)`` to task classes.
"""

from __future__ import annotations

from .base import ApplyFn, ModelOutput, out_to_loss_from_loss
from .classification import (BinaryClassification, ImageClassification, TextClassification,
                             classification_margin, one_minus_p)
from .clip import CLIP, CLIPBank, clip_embedding_bank
from .language import CausalLM, target_weights

__all__ = [
    "ApplyFn",
    "ModelOutput",
    "ImageClassification",
    "TextClassification",
    "BinaryClassification",
    "CLIP",
    "CLIPBank",
    "CausalLM",
    "TASKS",
    "get_task",
    "out_to_loss_from_loss",
    "classification_margin",
    "one_minus_p",
    "clip_embedding_bank",
    "target_weights",
]

TASKS: dict[str, type[ModelOutput]] = {
    "image_classification": ImageClassification,
    "classification": ImageClassification,
    "text_classification": TextClassification,
    "binary_classification": BinaryClassification,
    "clip": CLIP,
    "causal_lm": CausalLM,
}


def get_task(task: str | ModelOutput | type[ModelOutput]) -> ModelOutput:
    """Resolve ``task=``: a registered name, a ModelOutput instance, or a subclass of it.

    Names and subclasses are instantiated with no arguments; tasks that need some (CLIP's
    bank and key) must be passed as instances.
    """
    if isinstance(task, ModelOutput):
        return task
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(
                f"task={task!r} is not a registered task; valid names are "
                f"{sorted(TASKS)}, or pass an instance of a trax_attr.ModelOutput subclass."
            )
        name, cls = repr(task), TASKS[task]
    elif isinstance(task, type) and issubclass(task, ModelOutput):
        name, cls = task.__name__, task
    else:
        raise TypeError(
            f"task must be a task name, a trax_attr.ModelOutput instance or subclass; got "
            f"{type(task).__name__} ({task!r})."
        )
    try:
        return cls()
    except TypeError as err:
        raise TypeError(
            f"task={name} cannot be built without arguments ({err}); pass an instance "
            f"instead, e.g. task=trax_attr.{cls.__name__}(...)."
        ) from None
