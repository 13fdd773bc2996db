"""What the op modules share: the op table, dtypes, and the refusal every route names."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

HIGHEST = jax.lax.Precision.HIGHEST

# "aten.add.Tensor" (str of the OpOverload) or "operator.getitem" -> a jnp implementation
# taking the op's arguments as its ATen schema names them. Filled by @op at import time.
OPS: dict[str, Callable] = {}


class UnsupportedOpError(NotImplementedError):
    """The converted route (backend="converted") cannot express an op of the module."""


def unsupported(what: str, detail: str = "") -> UnsupportedOpError:
    return UnsupportedOpError(
        f"{what} is not supported by interop's torch->JAX conversion{detail}. Use "
        "backend=\"torch\" (per-example gradients computed in torch with torch.func), e.g. "
        "TRAKer(model=module, ..., backend=\"torch\")."
    )


def op(*names: str):
    """Register the decorated function as the jnp body of ``aten.<name>`` for each name
    that this torch defines (``"add.Tensor"``; names of other versions are skipped)."""
    def register(fn):
        for name in names:
            if name.startswith("operator."):
                OPS[name] = fn
                continue
            packet, overload = name.split(".")
            if overload in getattr(getattr(torch.ops.aten, packet, None), "overloads",
                                   lambda: ())():
                OPS[f"aten.{name}"] = fn
        return fn

    return register


def op_name(target) -> str:
    """The table key of an fx node's target: ``aten.add.Tensor``, ``operator.getitem``."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator"}.get(module, module)
    return f"{module}.{getattr(target, '__name__', repr(target))}"


_DTYPES = {torch.float32: jnp.float32, torch.float64: jnp.float64, torch.float16: jnp.float16,
           torch.bfloat16: jnp.bfloat16, torch.int8: jnp.int8, torch.int16: jnp.int16,
           torch.int32: jnp.int32, torch.int64: jnp.int64, torch.uint8: jnp.uint8,
           torch.bool: jnp.bool_}


def dtype(torch_dtype):
    """A torch dtype as JAX's (None stays None); 64-bit types become 32-bit unless
    jax_enable_x64, as everywhere in JAX (torch's int64 indices are int32 here)."""
    if torch_dtype is None:
        return None
    if isinstance(torch_dtype, torch.dtype):
        if torch_dtype not in _DTYPES:
            raise unsupported(f"dtype {torch_dtype}",
                              f" (converted dtypes: {sorted(map(str, _DTYPES))})")
        torch_dtype = _DTYPES[torch_dtype]
    return jax.dtypes.canonicalize_dtype(torch_dtype)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor's values as numpy, in the dtype JAX will hold them in."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return np.asarray(jnp.asarray(tensor.float().numpy(), jnp.bfloat16))
    return tensor.numpy().astype(dtype(tensor.dtype), copy=False)


def axes(dim, ndim: int) -> tuple[int, ...] | None:
    """ATen's ``int[1]? dim`` as numpy axes: None and [] mean every axis."""
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d % max(ndim, 1) for d in dims) or None


def tuple_of(value, n: int) -> tuple[int, ...]:
    """``int[2] kernel_size`` as given (one int, a list of one, or n) -> n ints."""
    value = (value,) if isinstance(value, int) else tuple(value)
    return value * n if len(value) == 1 else value
