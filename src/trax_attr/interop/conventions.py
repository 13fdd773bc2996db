"""How a task's call reaches a torch module, and how the module's outputs come back.

Tasks call ``apply_fn(params, *inputs)`` with batched inputs in the order their
docstrings give:

=====================  =========================================================
task                   inputs
=====================  =========================================================
image classification   ``images``
text classification    ``input_ids, attention_mask[, token_type_ids]``
causal LM              ``input_ids, attention_mask``
CLIP                   ``images, texts`` -> ``(image_emb, text_emb, logit_scale)``
=====================  =========================================================

A plain torch module (torchvision, timm, open_clip, your own) is called with those inputs
positionally, and its output is used as it is: a tensor, or a tuple, list or dict of
tensors (open_clip's ``output_dict=True`` dict becomes its tuple). A HuggingFace
``transformers`` model is called by keyword, because its positional order is not the
tasks' (BERT's third argument is ``token_type_ids``, GPT-2's second is the KV cache):

* the inputs are named ``(main_input_name, "attention_mask", "token_type_ids")``, i.e.
  ``input_ids`` for text models, ``pixel_values`` for vision models;
* a CLIP model (``get_image_features`` and ``get_text_features``, e.g. ``CLIPModel``)
  takes ``(pixel_values, input_ids[, attention_mask])`` and returns ``(image_embeds,
  text_embeds, logit_scale.exp())``, the order of open_clip and of the CLIP task;
* ``use_cache=False`` where the model has a cache (GPT-2), and the output is ``.logits``;
* a 2-D ``attention_mask`` goes in as the boolean 4-D mask HF builds from it (padding,
  and causal for a decoder-only model): transformers' 2-D mask code branches on the mask's
  values, which ``torch.func.vmap`` cannot map, so per-example gradients would be computed
  one example at a time. The 4-D mask is used only once one call on real inputs has given
  the same outputs as the 2-D mask (:class:`Called` checks, then remembers).

:class:`Called` is the module wrapped so that ``Called(module)(*inputs)`` does this;
both routes run it (``backend="torch"`` through ``torch.func.functional_call``,
``backend="converted"`` through the converter), so they call the model the same way.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["Called", "InputsError", "is_huggingface", "needs_convention", "PREFIX"]

PREFIX = "model."  # Called holds the module as .model: its names gain this prefix

_CLIP_KEYS = ("image_features", "text_features", "logit_scale")


class InputsError(TypeError):
    """The task's inputs do not fit the model's call (never a conversion problem: the
    converted route raises it as it is)."""


def is_huggingface(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.PreTrainedModel`` (imports nothing)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def _is_clip(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in
               ("get_image_features", "get_text_features", "logit_scale"))


def needs_convention(module: nn.Module) -> bool:
    """Whether ``module`` must be called through :class:`Called` (a HF model)."""
    return is_huggingface(module)


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _mask_form(module: nn.Module) -> str | None:
    """``"causal"`` (decoder-only), ``"padding"`` (encoder-only) or None (other models)."""
    transformers = sys.modules["transformers"]
    if getattr(module.config, "is_encoder_decoder", False) or _is_clip(module):
        return None
    return "causal" if isinstance(module, transformers.GenerationMixin) else "padding"


def four_d_mask(mask: torch.Tensor, form: str) -> torch.Tensor:
    """``(B, T)`` 0/1 mask -> ``(B, 1, T, T)`` bool: key j visible from query i."""
    t = mask.shape[-1]
    keys = mask[:, None, None, :].bool().expand(-1, 1, t, t)
    if form == "causal":
        keys = keys & torch.tril(torch.ones(t, t, dtype=torch.bool, device=mask.device))
    return keys


def _plain(tensor: torch.Tensor) -> bool:
    """A real tensor (not fake, not inside a torch.func transform): its values can be read."""
    from torch._subclasses.fake_tensor import FakeTensor

    return (not isinstance(tensor, FakeTensor)
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor))


def _same(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b))


def huggingface_call(module: nn.Module, inputs: tuple, mask_checked: dict | None = None):
    """Call a HF model with the tasks' positional ``inputs`` by keyword; its tensors.

    ``mask_checked`` (``{"ok": bool}`` once decided) records whether the 4-D mask gives
    the 2-D mask's outputs for this model; without it the 2-D mask is passed as it is."""
    clip = _is_clip(module)
    if clip:
        names = ("pixel_values", "input_ids", "attention_mask")
    elif module.main_input_name == "input_ids":
        names = ("input_ids", "attention_mask", "token_type_ids")
    else:
        names = (module.main_input_name,)
    if len(inputs) > len(names):
        raise InputsError(
            f"{type(module).__name__} (HuggingFace) was called with {len(inputs)} inputs, but "
            f"trax_attr passes a HF model at most {len(names)}, named {list(names)}; give "
            "the task's inputs in that order (see trax_attr.interop.conventions).")
    kwargs = dict(zip(names, inputs))
    if "token_type_ids" in kwargs and not _accepts(module, "token_type_ids"):
        raise InputsError(
            f"{type(module).__name__}.forward takes no token_type_ids (its **kwargs would "
            "swallow them unused), but the batch holds a third input: pass (input_ids, "
            "attention_mask, labels) for this model.")
    if _accepts(module, "use_cache"):
        kwargs["use_cache"] = False
    mask = kwargs.get("attention_mask")
    form = _mask_form(module) if mask is not None and mask.ndim == 2 else None
    if form is None or mask_checked is None:
        return _outputs(module, module(**kwargs, return_dict=True), clip)
    four_d = {**kwargs, "attention_mask": four_d_mask(mask, form)}
    if "ok" not in mask_checked:
        if not (_plain(mask) and bool((mask.sum(-1) > 0).all())):
            return _outputs(module, module(**kwargs, return_dict=True), clip)  # cannot check
        want = _outputs(module, module(**kwargs, return_dict=True), clip)
        got = _outputs(module, module(**four_d, return_dict=True), clip)
        mask_checked["ok"] = _same([got], [want])
        return want
    return _outputs(module, module(**(four_d if mask_checked["ok"] else kwargs),
                                   return_dict=True), clip)


def _outputs(module, out, clip):
    if clip:
        return out.image_embeds, out.text_embeds, module.logit_scale.exp()
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


def plain_outputs(out):
    """A plain module's outputs as tensors, tuples or dicts of them (open_clip's dict: its
    tuple)."""
    if isinstance(out, Mapping) and all(key in out for key in _CLIP_KEYS):
        return tuple(out[key] for key in _CLIP_KEYS)
    return out


class Called(nn.Module):
    """``module`` called the way trax_attr's tasks call models (module docstring)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.model = module
        self.mask_checked: dict = {}  # {"ok": bool} once the 4-D mask has been checked

    def forward(self, *inputs: torch.Tensor):
        if is_huggingface(self.model):
            return huggingface_call(self.model, inputs, self.mask_checked)
        return plain_outputs(self.model(*inputs))
