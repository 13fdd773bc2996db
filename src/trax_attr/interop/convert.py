"""Route 1: a torch ``nn.Module`` as a pure JAX function, by interpreting its exported graph.

``convert(module)`` returns ``apply(params, buffers, *inputs)``. The first time ``apply``
meets an input signature (the shapes and dtypes of ``inputs``: ``(1, ...)`` under TRAK's
vmap of one example, ``(B, ...)`` for the out-to-loss pass), it exports the module for it
with ``torch.export.export`` (on zero tensors of those shapes, the module in eval mode),
decomposes the program to the core ATen op set (``run_decompositions``), checks every op
against the op table (:mod:`interop.aten`), and caches the program on ``apply``. Each call
then interprets the graph node by node with jnp: parameters and buffers are read from the
two dicts, so jit, vmap, grad and sharding apply unchanged, and nothing of torch runs in
the computation itself.

Why torch.export: torch.fx's symbolic tracing stops at the first Python branch on a
shape or a config flag, which HuggingFace and open_clip models are full of; export traces
what actually runs for the given shapes, through any Python, down to ~190 core ops. Why
our own interpreter: torchax 0.0.13 does not import with torch 2.13, and torch2jax 0.1.0
covers a fraction of the ops (benchmarks/interop_converters.py).

An unsupported model raises :class:`UnsupportedOpError` before anything is computed,
listing every op the table lacks, with counts, and what produces it.
"""
from __future__ import annotations

import collections
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import torch
import torch.utils._pytree as pytree
from torch import nn

from .aten import SUPPORTED_OPS, UnsupportedOpError
from .interpret import run, select, state, unflatten
from .program import KEPT_OPS, Program, prepare

__all__ = ["UnsupportedOpError", "convert", "SUPPORTED_OPS", "KEPT_OPS"]

_TO_TORCH = {jnp.dtype(k): v for k, v in {
    jnp.float32: torch.float32, jnp.float64: torch.float64, jnp.float16: torch.float16,
    jnp.bfloat16: torch.bfloat16, jnp.int8: torch.int8, jnp.int16: torch.int16,
    # JAX's int32 indices are torch's int64 ones (torch's embedding, gather and one_hot
    # want int64): exported as int64, computed in int32 unless jax_enable_x64
    jnp.int32: torch.int64, jnp.int64: torch.int64, jnp.uint8: torch.uint8,
    jnp.bool_: torch.bool}.items()}



def convert(module: nn.Module, *, input_names: Sequence[str] | None = None,
            forward_kwargs: Mapping[str, Any] | None = None,
            output: str | int | None = None) -> Callable[..., Any]:
    """Convert ``module`` into ``apply(params, buffers, *inputs)`` over jnp arrays.

    Args:
      module: a torch module; exported in eval mode (BatchNorm with its running
        statistics, dropout off) and left as it was.
      input_names: bind the positional ``inputs`` of ``apply`` to these keyword
        parameters of ``module.forward``, in order (e.g. ``("input_ids",
        "attention_mask")`` for GPT-2, whose second positional parameter is
        ``past_key_values``). None: inputs are passed positionally.
      forward_kwargs: constant (non-tensor) keyword arguments of every forward call,
        e.g. ``{"use_cache": False}`` for HuggingFace decoders.
      output: pick one entry of the module's output: a key (``"logits"`` of a
        HuggingFace ``ModelOutput``) or an index (of a tuple). None: the whole output, a
        tensor or a tuple / list / dict of them (``ModelOutput`` becomes a dict).

    Returns:
      ``apply(params, buffers, *inputs) -> outputs``: ``params`` is a dict of jnp arrays
      named as in ``module.named_parameters()`` (the state_dict's names), ``buffers``
      those of ``module.named_buffers()`` (persistent floating-point buffers, such as
      BatchNorm statistics, are required; integer and non-persistent ones default to the
      module's values); inputs and outputs keep torch's layout (NCHW images). The
      exported programs are cached per input signature in ``apply.programs``.

    Raises:
      UnsupportedOpError (when ``apply`` first meets a signature, before computing):
        the module cannot be exported, or its graph holds ops outside
        :data:`SUPPORTED_OPS` (all listed) or arguments the table refuses.
      ValueError: ``input_names`` that ``module.forward`` does not take.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    forward_kwargs = dict(forward_kwargs or {})
    names = None if input_names is None else tuple(input_names)
    if names is not None:
        _check_names(module, names + tuple(forward_kwargs))
    groups = _shared_names(module)
    programs: dict[tuple, Program] = {}
    label = type(module).__name__

    def apply(params, buffers, *inputs):
        inputs = tuple(jnp.asarray(x) for x in inputs)
        if names is not None and len(inputs) > len(names):
            raise TypeError(f"{label}'s apply binds inputs to input_names={names}; got "
                            f"{len(inputs)} inputs.")
        signature = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in inputs)
        if signature not in programs:
            programs[signature] = prepare(module, _bind(names, forward_kwargs, inputs,
                                                         _example), label, signature)
        program = programs[signature]
        env = state(program, params, buffers, groups, label)
        leaves = pytree.tree_leaves(_bind(names, forward_kwargs, inputs, lambda x: x))
        for (placeholder, constant), leaf in zip(program.user_inputs, leaves):
            env[placeholder] = leaf if constant is None else constant.value
        result = unflatten(program.out_spec, run(program, env))
        return result if output is None else select(result, output, label)

    apply.programs = programs
    return apply


def _check_names(module, names):
    parameters = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [n for n in names if n not in parameters]
    if unknown:
        raise ValueError(f"input_names / forward_kwargs {unknown} are not parameters of "
                         f"{type(module).__name__}.forward{inspect.signature(module.forward)}; "
                         "name its keyword parameters.")


def _shared_names(module) -> dict[str, tuple[str, ...]]:
    """Every name of a tensor -> all its names (a tied weight has several)."""
    by_id = collections.defaultdict(list)
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        by_id[id(tensor)].append(name)
    return {name: tuple(group) for group in by_id.values() for name in group}


def _example(x) -> torch.Tensor:
    if x.dtype not in _TO_TORCH:
        raise TypeError(f"an input of dtype {x.dtype} has no torch counterpart; pass one of "
                        f"{sorted(d.name for d in _TO_TORCH)}.")
    return torch.zeros(x.shape, dtype=_TO_TORCH[x.dtype])


def _bind(names, forward_kwargs, inputs, leaf):
    values = tuple(leaf(x) for x in inputs)
    if names is None:
        return values, dict(forward_kwargs)
    return (), {**forward_kwargs, **dict(zip(names, values))}
