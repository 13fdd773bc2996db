"""Running an exported program on jax arrays: the graph interpreted node by node with
the op table's jnp bodies (:func:`run`), the state it reads (:func:`state`), and its
outputs as JAX containers (:func:`unflatten`, :func:`select`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import torch

from .aten import MISSING_REASONS, OPS, UnsupportedOpError, op_name
from .aten.base import dtype as jax_dtype

__all__ = ["MISSING", "state", "run", "like_torch", "unflatten", "select"]

# The value of a node the check could not compute (it follows an unsupported op).
MISSING = object()

def state(program, params, buffers, groups, label) -> dict[str, Any]:
    """Placeholder -> value of every parameter, buffer and constant of the program."""
    env = dict(program.constants)
    for placeholder, name, role, required in program.state:
        source = "params" if role == "parameter" else "buffers"
        values = params if source == "params" else buffers
        found = [values[n] for n in groups.get(name, (name,)) if n in values]
        if found:
            env[placeholder] = found[0]
        elif required:
            raise ValueError(
                f"{label} reads the {role} {name!r}, which is missing from the "
                f"{source} passed to apply; pass every "
                "name of module.named_parameters() as params and its floating-point "
                "named_buffers() (e.g. BatchNorm's running_mean) as buffers.")
    return env


def run(program, env: dict[str, Any], note=None) -> list:
    """Interpret the graph; returns the user outputs, flat. With ``note(op, reason, node)`` (the
    check), problems are noted and their outputs replaced by zeros of torch's shapes, or
    by :data:`MISSING` where those are unknown (a data-dependent size, a dtype JAX lacks);
    ops reading a MISSING value are skipped, unnoted: they follow from the first."""
    def load(arg):
        return torch.fx.node.map_arg(arg, lambda n: env[n.name])

    def reads_missing(node):
        found = []
        torch.fx.node.map_arg((node.args, node.kwargs),
                              lambda n: found.append(env.get(n.name) is MISSING))
        return any(found)

    for node in program.nodes:
        if node.op != "call_function":
            if node.op not in ("placeholder", "output"):
                raise UnsupportedOpError(
                    f"a {node.op} node ({node.target}) in the exported graph: control flow "
                    "(torch.cond, loops over tensors) is not converted. Use backend=\"torch\".")
            continue
        name = op_name(node.target)
        fn = OPS.get(name)
        if note is not None and reads_missing(node):
            env[node.name] = MISSING
            continue
        try:
            if fn is None:
                raise UnsupportedOpError(MISSING_REASONS.get(name, "not in the op table"))
            value = fn(*load(node.args), **load(node.kwargs))
            if node.name in program.stop_gradient:
                value = jax.lax.stop_gradient(value)
            env[node.name] = like_torch(value, node.meta.get("val"), name)
        except UnsupportedOpError as err:
            if note is None:
                raise
            note(name, str(err).split(" is not supported by")[0].split(". Use backend")[0], node)
            env[node.name] = _zeros_like(node.meta.get("val"))
        if note is not None and env[node.name] is None and len(node.users):
            note(name, "an output the converted op does not compute is used", node)
    return [env[out] if isinstance(out, str) else out.value for out in program.outputs]


def like_torch(value, val, name):
    """Cast to the dtype torch recorded for the node (so JAX's promotion rules never
    differ from torch's) and check the shape."""
    if value is MISSING:
        return value
    if isinstance(val, torch.Tensor):
        if value is None:
            return None
        value = jnp.asarray(value)
        want = jax_dtype(val.dtype)
        if value.dtype != want:
            value = value.astype(want)
        shape = tuple(val.shape)
        if all(isinstance(d, int) for d in shape) and value.shape != shape:
            raise RuntimeError(f"the converted {name} computed shape {value.shape} where torch's "
                               f"is {shape}: a bug of trax_attr's op table; please report it "
                               "and use backend=\"torch\" meanwhile.")
        return value
    if isinstance(val, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(value)(like_torch(v, t, name) for v, t in zip(value, val))
    return value


def _zeros_like(val):
    if isinstance(val, torch.Tensor):
        shape = tuple(val.shape)
        try:
            return jnp.zeros(shape, jax_dtype(val.dtype)) if all(
                isinstance(d, int) for d in shape) else MISSING
        except UnsupportedOpError:  # a dtype JAX has no counterpart of
            return MISSING
    if isinstance(val, (tuple, list)):
        return type(val)(_zeros_like(v) for v in val)
    return MISSING if isinstance(val, torch.SymInt) else val


# --- outputs ---------------------------------------------------------------------------------

def unflatten(spec, leaves):
    """torch's output pytree with jax leaves, as JAX containers (a ModelOutput -> dict)."""
    leaves = iter(leaves)

    def build(node):
        if node.is_leaf():
            return next(leaves)
        children = [build(child) for child in node.children_specs]
        if node.type in (tuple, list):
            return node.type(children)
        if node.type is dict or isinstance(node.context, (list, tuple)) and all(
                isinstance(k, str) for k in node.context):
            return dict(zip(node.context, children))
        if hasattr(node.type, "_fields"):  # a namedtuple
            return node.type(*children)
        return tuple(children)

    return build(spec)


def select(result, output, label):
    try:
        return result[output]
    except (KeyError, IndexError, TypeError):
        keys = list(result) if isinstance(result, dict) else (
            f"indices 0..{len(result) - 1}" if isinstance(result, (tuple, list)) else "none")
        raise ValueError(f"output={output!r} is not an entry of {label}'s output (entries: "
                         f"{keys}); pass one of them or output=None.") from None
