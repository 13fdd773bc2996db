"""The torch module exported for one input signature: ``torch.export`` and ATen
decomposition, the graph's inputs sorted into user inputs, parameters, buffers and
constants, and the check that lists every op the table lacks (:func:`prepare`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind

from .aten import UnsupportedOpError, op_name
from .conventions import InputsError
from .aten.base import dtype as jax_dtype
from .aten.base import to_numpy
from .interpret import run

__all__ = ["KEPT_OPS", "Program", "Constant", "prepare"]

# Ops kept whole rather than decomposed: sdpa's decomposition is a dozen ops (a softmax
# guarded against fully-masked rows) and, on GPT-2, one that cannot even be traced (a
# view of a transposed tensor); its jnp body is the math kernel directly.
KEPT_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)


class Program(NamedTuple):
    """The module exported for one input signature, ready to interpret."""

    exported: torch.export.ExportedProgram
    nodes: tuple[torch.fx.Node, ...]
    user_inputs: tuple[tuple[str, Any], ...]  # (placeholder, None | constant) per input leaf
    state: tuple[tuple[str, str, str, bool], ...]  # (placeholder, name, kind, required)
    constants: dict[str, np.ndarray]          # placeholder -> value (lifted tensors, ...)
    outputs: tuple[Any, ...]                  # per output leaf: a node name or a constant
    out_spec: Any
    stop_gradient: frozenset[str]             # nodes that were Tensor.detach()


def prepare(module, call, label, signature) -> Program:
    shown = ", ".join(f"{list(shape)} {dt}" for shape, dt in signature)
    where = f"{label} (inputs {shown})"
    exported = _export(module, call, where)
    graph_signature = exported.graph_signature
    state, constants, user_inputs = [], {}, []
    for spec in graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind is InputKind.USER_INPUT:
            constant = isinstance(spec.arg, ConstantArgument)
            user_inputs.append((name, Constant(spec.arg.value) if constant else None))
        elif spec.kind is InputKind.PARAMETER:
            state.append((name, spec.target, "parameter", True))
        elif spec.kind is InputKind.BUFFER:
            value = (exported.state_dict if spec.persistent else exported.constants)[spec.target]
            required = bool(spec.persistent) and value.is_floating_point()
            state.append((name, spec.target, "buffer", required))
            if not required:  # integer and non-persistent buffers: the module's own values
                constants[name] = to_numpy(value)
        elif spec.kind is InputKind.CONSTANT_TENSOR:
            constants[name] = to_numpy(exported.constants[spec.target])
        else:
            raise UnsupportedOpError(f"{where} takes a {spec.kind.name} input ({spec.target}); "
                                     "the converted route takes tensors only. Use "
                                     "backend=\"torch\".")
    nodes = tuple(exported.graph.nodes)
    output_node = nodes[-1]
    outputs = []
    for spec, arg in zip(graph_signature.output_specs, output_node.args[0]):
        if spec.kind is OutputKind.USER_OUTPUT:  # buffer mutations of forward are dropped
            outputs.append(arg.name if isinstance(arg, torch.fx.Node) else Constant(arg))
    program = Program(exported, nodes, tuple(user_inputs), tuple(state), constants,
                      tuple(outputs), exported.call_spec.out_spec, _detached(nodes))
    _check(program, where)
    return program


class Constant(NamedTuple):
    value: Any


def _export(module, call, where):
    args, kwargs = call
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        exported = torch.export.export(module, args, kwargs, strict=False)
        table = torch.export.default_decompositions()
        for kept in KEPT_OPS:
            table.pop(kept, None)
        return exported.run_decompositions(table)
    except InputsError:  # the inputs do not fit the model: not a conversion problem
        raise
    except Exception as err:  # export raises many types; the cause is kept
        text = str(err).strip().splitlines()
        hint = ""
        if "data-dependent" in str(err):
            hint = (" The forward branches on a tensor's value (e.g. `if x.sum() > 0`): "
                    "write it with torch.where.")
        elif "Cache" in str(err) and "pytree" in str(err):
            hint = (" The output holds a cache object: pass forward_kwargs={'use_cache': "
                    "False}.")
        raise UnsupportedOpError(
            f"torch.export could not trace {where} ({type(err).__name__}: "
            f"{text[0] if text else ''}).{hint} Use backend=\"torch\" if the forward cannot "
            "be exported."
        ) from err
    finally:
        for m, training in modes.items():
            m.train(training)


def _detached(nodes) -> frozenset[str]:
    """Decomposition turns ``Tensor.detach()`` into ``aten.alias``; its provenance says
    which aliases were detaches, whose gradient must stop as in torch."""
    names = set()
    for node in nodes:
        if node.op == "call_function" and op_name(node.target) == "aten.alias.default":
            sources = node.meta.get("from_node") or ()
            if any(getattr(s, "target", None) == "aten.detach.default" for s in sources):
                names.add(node.name)
    return frozenset(names)


def _check(program: Program, where: str) -> None:
    """Run the graph abstractly (jax.eval_shape, nothing computed) and gather every op
    the table lacks or refuses, so the error names them all at once."""
    problems: dict[str, list] = {}

    def note(name, reason, node):
        problems.setdefault(name, [0, reason, _source(node)])[0] += 1

    def spec(val):
        return jax.ShapeDtypeStruct(tuple(val.shape), jax_dtype(val.dtype))

    def abstract():
        env = {}
        for node in program.nodes:
            if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
                env[node.name] = jnp.zeros(spec(node.meta["val"]).shape,
                                           spec(node.meta["val"]).dtype)
        for placeholder, constant in program.user_inputs:
            if constant is not None:
                env[placeholder] = constant.value
        run(program, env, note)

    jax.eval_shape(abstract)
    if problems:
        lines = "\n".join(f"  {name} x{count}: {reason}{source}"
                          for name, (count, reason, source) in sorted(problems.items()))
        raise UnsupportedOpError(
            f"{where} cannot be converted: {len(problems)} op(s) of its exported graph are "
            f"not supported:\n{lines}\nUse backend=\"torch\" (per-example gradients computed "
            "in torch with torch.func), e.g. TRAKer(model=module, ..., backend=\"torch\"), "
            "or rewrite those parts of forward. The converted ops: "
            "trax_attr.interop.convert.SUPPORTED_OPS."
        )


def _source(node) -> str:
    """`` (first in blocks.0.attn, a Attention)``: the submodule whose forward made it."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, kind = list(stack.values())[-1]
    kind = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
    return f" (first in {path or 'the module itself'}, a {kind})"

