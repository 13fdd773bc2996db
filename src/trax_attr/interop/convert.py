"""Route 1: a torch ``nn.Module`` as a pure JAX function, by interpreting its torch.fx graph.

``convert(module)`` traces the module once with ``torch.fx.symbolic_trace`` and returns
``apply(params, buffers, *inputs)``: every node of the graph becomes one jnp call, every
parameter and buffer is read from the two dicts (named as in ``module.state_dict()``), so
jit, vmap, grad and sharding apply unchanged. The module is evaluated as in eval mode:
BatchNorm uses its running statistics, dropout is the identity.

Why our own interpreter: torchax 0.0.13 does not import with torch 2.13 (its op table
refers to an overload torch removed), and torch2jax 0.1.0 misses Conv1d, Embedding,
avg_pool2d, Tensor.chunk (so attention blocks) and differs from torch's exact GELU by
1e-4; numbers in the README (Compare with torch), measured by benchmarks/interop_converters.py.
The op list below is deliberately small and each op is checked against torch in
tests/interop/test_convert.py; anything else raises :class:`UnsupportedOpError`
naming the op, before any computation, and points to ``backend="torch"``.

Besides layers, the list holds the tensor glue of attention code: einsum, where,
masked_fill, tril/triu, factories (arange, ones, zeros, full and their ``_like``), casts
(``.bool()``, ``.to(dtype)`` ...), comparisons and logical operators, and shape arithmetic
(``x.shape``, ``x.size(1)``, ``//``, ``math.sqrt``). Tensors made inside forward
(``torch.tensor(-1e9)``) become constants of the JAX function. Dtypes follow JAX: int64
and float64 are int32 and float32 unless ``jax_enable_x64`` is set.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["UnsupportedOpError", "convert", "SUPPORTED_MODULES", "SUPPORTED_FUNCTIONS",
           "SUPPORTED_METHODS"]


class UnsupportedOpError(NotImplementedError):
    """The converted route (backend="converted") cannot express an op of the module."""


def _unsupported(what: str, detail: str = "") -> UnsupportedOpError:
    return UnsupportedOpError(
        f"{what} is not supported by interop's torch->JAX conversion{detail}. Use "
        "backend=\"torch\" (per-example gradients computed in torch with torch.func), e.g. "
        "TRAKer(model=module, ..., backend=\"torch\")."
    )


def _pair(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


# --- functional ops, torch signatures, jnp bodies ------------------------------------------

def _linear(x, weight, bias=None):
    y = jnp.matmul(x, weight.T, precision=jax.lax.Precision.HIGHEST)
    return y if bias is None else y + bias


def _conv(n: int):
    spatial = "DHW"[-n:] if n <= 3 else None

    def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if isinstance(padding, str):
            pad = padding.upper()
            if pad not in ("SAME", "VALID"):
                raise _unsupported(f"conv padding={padding!r}")
        else:
            pad = [(p, p) for p in _pair(padding, n)]
        lhs = "NC" + spatial
        y = jax.lax.conv_general_dilated(
            x, weight, window_strides=_pair(stride, n), padding=pad,
            rhs_dilation=_pair(dilation, n), feature_group_count=int(groups),
            dimension_numbers=(lhs, "OI" + spatial, lhs),
            precision=jax.lax.Precision.HIGHEST)
        if bias is not None:
            y = y + bias.reshape((1, -1) + (1,) * n)
        return y

    return conv


def _batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    if training or running_mean is None:
        raise _unsupported("batch_norm with batch statistics (training mode or "
                           "track_running_stats=False)",
                           "; TRAK evaluates BatchNorm with its running statistics")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - running_mean.reshape(shape)) * jax.lax.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    axes = tuple(range(x.ndim - len(_pair(normalized_shape, 1)), x.ndim))
    mean = x.mean(axes, keepdims=True)
    var = jnp.square(x - mean).mean(axes, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _embedding(indices, weight, padding_idx=None, max_norm=None, *args, **kwargs):
    if max_norm is not None:
        raise _unsupported("embedding with max_norm (it renormalises weights in place)")
    return jnp.take(weight, indices, axis=0)


def _gelu(x, approximate="none"):
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def _pool(n: int, kind: str):
    def pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
             count_include_pad=True, divisor_override=None, return_indices=False):
        if ceil_mode or return_indices or divisor_override is not None:
            raise _unsupported(f"{kind}_pool{n}d with ceil_mode, return_indices or "
                               "divisor_override")
        if kind == "avg" and not count_include_pad and padding:
            raise _unsupported("avg_pool with count_include_pad=False and padding")
        if _pair(dilation, n) != (1,) * n:
            raise _unsupported(f"{kind}_pool{n}d with dilation={dilation}")
        kernel = _pair(kernel_size, n)
        strides = kernel if stride is None or stride == [] else _pair(stride, n)
        pads = ((0, 0), (0, 0)) + tuple((p, p) for p in _pair(padding, n))
        window, steps = (1, 1) + kernel, (1, 1) + strides
        if kind == "max":
            return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, steps, pads)
        total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, steps, pads)
        return total / math.prod(kernel)

    return pool


def _max_pool(n):
    pool = _pool(n, "max")
    return lambda x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, \
        return_indices=False: pool(x, kernel_size, stride, padding, dilation, ceil_mode,
                                   return_indices=return_indices)


def _avg_pool(n):
    pool = _pool(n, "avg")
    return lambda x, kernel_size, stride=None, padding=0, ceil_mode=False, \
        count_include_pad=True, divisor_override=None: pool(
            x, kernel_size, stride, padding, 1, ceil_mode, count_include_pad, divisor_override)


def _adaptive_avg_pool(n: int):
    def pool(x, output_size):
        out = _pair(output_size, n)
        spatial = x.shape[-n:]
        out = tuple(s if o is None else o for o, s in zip(out, spatial))
        if any(s % o for s, o in zip(spatial, out)):
            raise _unsupported(f"adaptive_avg_pool{n}d from {spatial} to {out} (only sizes "
                               "that divide the input are converted)")
        shape = x.shape[:-n] + sum(((o, s // o) for o, s in zip(out, spatial)), ())
        return x.reshape(shape).mean(tuple(x.ndim - n + 2 * i + 1 for i in range(n)))

    return pool


def _dropout(x, p=0.5, training=False, inplace=False):
    if training:
        raise _unsupported("dropout in training mode")
    return x


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    if dropout_p:
        raise _unsupported(f"scaled_dot_product_attention with dropout_p={dropout_p}")
    if enable_gqa:
        raise _unsupported("scaled_dot_product_attention with enable_gqa=True")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = jnp.matmul(query, jnp.swapaxes(key, -1, -2),
                        precision=jax.lax.Precision.HIGHEST) * scale
    if is_causal:
        lq, lk = query.shape[-2], key.shape[-2]
        attn_mask = jnp.tril(jnp.ones((lq, lk), bool))
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            logits = jnp.where(attn_mask, logits, -jnp.inf)
        else:
            logits = logits + attn_mask
    return jnp.matmul(jax.nn.softmax(logits, axis=-1), value,
                      precision=jax.lax.Precision.HIGHEST)


def _softmax_of(fn):
    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if dtype is not None:
            x = x.astype(_dtype(dtype))
        if dim is None:  # torch's legacy implicit dim (F._get_softmax_dim), not all axes
            dim = 0 if x.ndim in (0, 1, 3) else 1
        return fn(x, axis=dim)

    return softmax


_softmax = _softmax_of(jax.nn.softmax)
_log_softmax = _softmax_of(jax.nn.log_softmax)


def _flatten(x, start_dim=0, end_dim=-1):
    start = start_dim % x.ndim
    end = end_dim % x.ndim
    return x.reshape(x.shape[:start] + (-1,) + x.shape[end + 1:])


def _sizes(size) -> tuple[int, ...]:
    """torch's ``view(2, 3)`` and ``view((2, 3))``, ``ones(2, 3)`` and ``ones((2, 3))`` alike."""
    return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size


def _chunk(x, chunks, dim=0):
    size = -(-x.shape[dim] // chunks)
    return tuple(jnp.split(x, list(range(size, x.shape[dim], size)), axis=dim))


def _split(x, split_size_or_sections, dim=0):
    if isinstance(split_size_or_sections, int):
        cuts = list(range(split_size_or_sections, x.shape[dim], split_size_or_sections))
    else:
        cuts = list(np.cumsum(split_size_or_sections)[:-1])
    return tuple(jnp.split(x, cuts, axis=dim))


def _reduce(fn):
    def reduce(x, dim=None, keepdim=False, *, dtype=None):
        axis = tuple(dim) if isinstance(dim, (tuple, list)) else dim
        return fn(x, axis=axis, keepdims=keepdim)

    return reduce


def _size(x, dim=None):
    return tuple(x.shape) if dim is None else x.shape[dim]


def _squeeze(x, dim=None):
    if dim is None:
        return jnp.squeeze(x)
    return jnp.squeeze(x, dim) if x.shape[dim] == 1 else x


# --- dtypes, factories, masks and casts: the glue of attention code ---------------------------

_DTYPES = {torch.float32: jnp.float32, torch.float64: jnp.float64, torch.float16: jnp.float16,
           torch.bfloat16: jnp.bfloat16, torch.int8: jnp.int8, torch.int16: jnp.int16,
           torch.int32: jnp.int32, torch.int64: jnp.int64, torch.uint8: jnp.uint8,
           torch.bool: jnp.bool_}


def _dtype(dtype):
    """A torch (or numpy) dtype as JAX's; 64-bit types become 32-bit unless jax_enable_x64,
    as everywhere in JAX (torch's default int64 indices are int32 here)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES:
            raise _unsupported(f"dtype {dtype}",
                               f" (converted dtypes: {sorted(map(str, _DTYPES))})")
        dtype = _DTYPES[dtype]
    return jax.dtypes.canonicalize_dtype(dtype)


def _constant(tensor: torch.Tensor) -> jax.Array:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return jnp.asarray(tensor.float().numpy(), jnp.bfloat16)
    return jnp.asarray(tensor.numpy(), _dtype(tensor.dtype))


def _factory(fill: float):
    def make(*size, dtype=None, out=None, layout=None, device=None, pin_memory=False,
             requires_grad=False):
        del layout, device, pin_memory, requires_grad  # placement is JAX's business
        if out is not None:
            raise _unsupported(f"a tensor factory with out= (fill {fill})")
        return jnp.full(_sizes(size), fill, _dtype(dtype or torch.get_default_dtype()))

    return make


def _full(size, fill_value, *, dtype=None, out=None, layout=None, device=None,
          pin_memory=False, requires_grad=False):
    if out is not None:
        raise _unsupported("torch.full with out=")
    if dtype is None and isinstance(fill_value, float):
        dtype = torch.get_default_dtype()
    return jnp.full(tuple(size), fill_value, None if dtype is None else _dtype(dtype))


def _like(fill):
    def like(x, *args, dtype=None, layout=None, device=None, requires_grad=False,
             memory_format=None):
        value = args[0] if fill is None else fill  # full_like(x, fill_value)
        return jnp.full_like(x, value, None if dtype is None else _dtype(dtype))

    return like


def _arange(start, end=None, step=1, *, dtype=None, out=None, layout=None, device=None,
            pin_memory=False, requires_grad=False):
    if out is not None:
        raise _unsupported("torch.arange with out=")
    if dtype is None and any(isinstance(v, float) for v in (start, end, step)):
        dtype = torch.get_default_dtype()
    return jnp.arange(start, end, step, dtype=None if dtype is None else _dtype(dtype))


def _einsum(equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = tuple(operands[0])  # torch.einsum("ij,jk", [a, b])
    return jnp.einsum(equation, *operands, precision=jax.lax.Precision.HIGHEST)


def _where(condition, input=None, other=None):
    if input is None and other is None:
        raise _unsupported("torch.where(condition) with one argument",
                           " (its output size depends on the data)")
    return jnp.where(condition, input, other)


def _tril(x, diagonal=0):
    return jnp.tril(x, diagonal)


def _triu(x, diagonal=0):
    return jnp.triu(x, diagonal)


def _masked_fill(x, mask, value):
    return jnp.where(mask, jnp.asarray(value).astype(x.dtype), x)


def _to(x, *args, dtype=None, non_blocking=False, copy=False, device=None,
        memory_format=None):
    """Tensor.to(dtype), .to(other), .to(device[, dtype]): only the dtype matters here."""
    for arg in args:
        if isinstance(arg, jax.Array):
            dtype = arg.dtype
        elif isinstance(arg, (torch.dtype, np.dtype, type)):
            dtype = arg
        elif not (arg is None or isinstance(arg, (str, bool, torch.device))):
            raise _unsupported(f"Tensor.to({arg!r})")
    return x if dtype is None else x.astype(_dtype(dtype))


def _cast(dtype):
    return lambda x, memory_format=None: x.astype(_dtype(dtype))


def _getattr(x, name):
    # the device is JAX's placement: None makes factories and .to(device) ignore it
    return None if name == "device" and isinstance(x, jax.Array) else getattr(x, name)


def _scalar_math(fn):
    """fx records math.sqrt(d) etc. on traced sizes; at run time they are Python numbers."""
    def apply(*args):
        if any(isinstance(a, jax.Array) for a in args):
            raise _unsupported(f"math.{fn.__name__} of a tensor",
                               f"; use torch.{fn.__name__} for tensors")
        return fn(*args)

    return apply


_MATH = {fn: _scalar_math(fn) for name, fn in vars(math).items()
         if not name.startswith("_") and callable(fn)}

_ELEMENTWISE = {"exp": jnp.exp, "log": jnp.log, "sqrt": jnp.sqrt, "rsqrt": jax.lax.rsqrt,
                "abs": jnp.abs}


SUPPORTED_FUNCTIONS: dict[Any, Callable] = {
    F.linear: _linear,
    F.conv1d: _conv(1),
    F.conv2d: _conv(2),
    F.batch_norm: _batch_norm,
    F.layer_norm: _layer_norm,
    F.embedding: _embedding,
    F.relu: lambda x, inplace=False: jax.nn.relu(x),
    torch.relu: jax.nn.relu,
    F.gelu: _gelu,
    F.silu: lambda x, inplace=False: jax.nn.silu(x),
    torch.tanh: jnp.tanh,
    torch.sigmoid: jax.nn.sigmoid,
    F.max_pool1d: _max_pool(1),
    F.max_pool2d: _max_pool(2),
    F.avg_pool1d: _avg_pool(1),
    F.avg_pool2d: _avg_pool(2),
    F.adaptive_avg_pool1d: _adaptive_avg_pool(1),
    F.adaptive_avg_pool2d: _adaptive_avg_pool(2),
    F.dropout: _dropout,
    F.scaled_dot_product_attention: _sdpa,
    F.softmax: _softmax,
    F.log_softmax: _log_softmax,
    torch.flatten: _flatten,
    torch.cat: lambda tensors, dim=0: jnp.concatenate(tensors, axis=dim),
    torch.matmul: lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST),
    torch.transpose: lambda x, a, b: jnp.swapaxes(x, a, b),
    torch.mean: _reduce(jnp.mean),
    torch.sum: _reduce(jnp.sum),
    torch.softmax: _softmax,
    torch.log_softmax: _log_softmax,
    torch.einsum: _einsum,
    torch.where: _where,
    torch.masked_fill: _masked_fill,
    torch.tril: _tril,
    torch.triu: _triu,
    torch.arange: _arange,
    torch.ones: _factory(1),
    torch.zeros: _factory(0),
    torch.full: _full,
    torch.ones_like: _like(1),
    torch.zeros_like: _like(0),
    torch.full_like: _like(None),
    torch.stack: lambda tensors, dim=0: jnp.stack(tensors, axis=dim),
    **{getattr(torch, name): fn for name, fn in _ELEMENTWISE.items()},
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    operator.neg: operator.neg,
    operator.matmul: lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST),
    operator.floordiv: operator.floordiv,
    operator.mod: operator.mod,
    operator.pow: operator.pow,
    operator.and_: operator.and_,
    operator.or_: operator.or_,
    operator.xor: operator.xor,
    operator.invert: operator.invert,
    operator.eq: operator.eq,
    operator.ne: operator.ne,
    operator.lt: operator.lt,
    operator.le: operator.le,
    operator.gt: operator.gt,
    operator.ge: operator.ge,
    operator.getitem: operator.getitem,
    getattr: _getattr,
    **_MATH,
}

SUPPORTED_METHODS: dict[str, Callable] = {
    "view": lambda x, *shape: x.reshape(_sizes(shape)),
    "reshape": lambda x, *shape: x.reshape(_sizes(shape)),
    "flatten": _flatten,
    "chunk": _chunk,
    "split": _split,
    "transpose": lambda x, a, b: jnp.swapaxes(x, a, b),
    "permute": lambda x, *dims: jnp.transpose(x, _sizes(dims)),
    "contiguous": lambda x: x,
    "size": _size,
    "mean": _reduce(jnp.mean),
    "sum": _reduce(jnp.sum),
    "relu": jax.nn.relu,
    "softmax": _softmax,
    "unsqueeze": lambda x, dim: jnp.expand_dims(x, dim),
    "squeeze": _squeeze,
    "add": operator.add,
    "mul": operator.mul,
    "log_softmax": _log_softmax,
    "masked_fill": _masked_fill,
    "where": lambda x, condition, other: jnp.where(condition, x, other),
    "tril": _tril,
    "triu": _triu,
    "to": _to,
    "type_as": lambda x, other: x.astype(other.dtype),
    "bool": _cast(torch.bool),
    "float": _cast(torch.float32),
    "double": _cast(torch.float64),
    "half": _cast(torch.float16),
    "int": _cast(torch.int32),
    "long": _cast(torch.int64),
    "dim": lambda x: x.ndim,
    **{name: lambda x, fn=fn: fn(x) for name, fn in _ELEMENTWISE.items()},
}


# --- modules: the module's constants, its tensors from the dicts ------------------------------

def _tensors(module, prefix, values, *names):
    return [values[f"{prefix}{n}"] if getattr(module, n, None) is not None else None
            for n in names]


def _linear_module(m, prefix, values, x):
    return _linear(x, *_tensors(m, prefix, values, "weight", "bias"))


def _conv_module(n):
    conv = _conv(n)

    def apply(m, prefix, values, x):
        if m.padding_mode != "zeros":
            raise _unsupported(f"Conv{n}d with padding_mode={m.padding_mode!r}")
        weight, bias = _tensors(m, prefix, values, "weight", "bias")
        return conv(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    return apply


def _batch_norm_module(m, prefix, values, x):
    if not m.track_running_stats:
        raise _unsupported(f"{type(m).__name__}(track_running_stats=False)",
                           "; TRAK evaluates BatchNorm with its running statistics")
    mean, var = values[f"{prefix}running_mean"], values[f"{prefix}running_var"]
    weight, bias = _tensors(m, prefix, values, "weight", "bias")
    return _batch_norm(x, mean, var, weight, bias, False, m.momentum, m.eps)


def _layer_norm_module(m, prefix, values, x):
    weight, bias = _tensors(m, prefix, values, "weight", "bias")
    return _layer_norm(x, m.normalized_shape, weight, bias, m.eps)


def _embedding_module(m, prefix, values, x):
    return _embedding(x, values[f"{prefix}weight"], m.padding_idx, m.max_norm)


def _stateless(fn):
    return lambda m, prefix, values, x: fn(m, x)


SUPPORTED_MODULES: dict[type, Callable] = {
    nn.Linear: _linear_module,
    nn.Conv1d: _conv_module(1),
    nn.Conv2d: _conv_module(2),
    nn.BatchNorm1d: _batch_norm_module,
    nn.BatchNorm2d: _batch_norm_module,
    nn.LayerNorm: _layer_norm_module,
    nn.Embedding: _embedding_module,
    nn.ReLU: _stateless(lambda m, x: jax.nn.relu(x)),
    nn.GELU: _stateless(lambda m, x: _gelu(x, m.approximate)),
    nn.SiLU: _stateless(lambda m, x: jax.nn.silu(x)),
    nn.Tanh: _stateless(lambda m, x: jnp.tanh(x)),
    nn.Sigmoid: _stateless(lambda m, x: jax.nn.sigmoid(x)),
    nn.Identity: _stateless(lambda m, x: x),
    nn.Dropout: _stateless(lambda m, x: x),
    nn.Flatten: _stateless(lambda m, x: _flatten(x, m.start_dim, m.end_dim)),
    nn.Softmax: _stateless(lambda m, x: _softmax(x, m.dim)),
    nn.LogSoftmax: _stateless(lambda m, x: _log_softmax(x, m.dim)),
    nn.MaxPool1d: _stateless(lambda m, x: _pool(1, "max")(
        x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
        return_indices=m.return_indices)),
    nn.MaxPool2d: _stateless(lambda m, x: _pool(2, "max")(
        x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
        return_indices=m.return_indices)),
    nn.AvgPool1d: _stateless(lambda m, x: _pool(1, "avg")(
        x, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, m.count_include_pad)),
    nn.AvgPool2d: _stateless(lambda m, x: _pool(2, "avg")(
        x, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, m.count_include_pad,
        m.divisor_override)),
    nn.AdaptiveAvgPool1d: _stateless(lambda m, x: _adaptive_avg_pool(1)(x, m.output_size)),
    nn.AdaptiveAvgPool2d: _stateless(lambda m, x: _adaptive_avg_pool(2)(x, m.output_size)),
}


def _module_handler(module: nn.Module):
    handler = SUPPORTED_MODULES.get(type(module))
    if handler is None:
        raise _unsupported(f"module {type(module).__module__}.{type(module).__qualname__}")
    return handler


def _function_name(target) -> str:
    return getattr(target, "__module__", "") + "." + getattr(target, "__name__", repr(target))


class _Tracer(torch.fx.Tracer):
    """Stops at the modules we convert as a whole, traces through containers."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in SUPPORTED_MODULES or super().is_leaf_module(m, qualname)


def convert(module: nn.Module) -> Callable[..., Any]:
    """Convert ``module`` into ``apply(params, buffers, *inputs)`` over jnp arrays.

    Args:
      module: a torch module; converted as if in eval mode. Its forward must be traceable
        by ``torch.fx.symbolic_trace`` (no Python control flow on tensor values).

    Returns:
      ``apply(params, buffers, *inputs) -> outputs``: ``params`` and ``buffers`` are dicts
      of jnp arrays named as in ``module.state_dict()``; inputs and outputs keep torch's
      layout (NCHW images).

    Raises:
      UnsupportedOpError: an op outside the converted list, named, before any computation.
    """
    # Tied weights appear under one name in named_parameters() (the params dict) but are
    # read under each owner's name.
    canonical: dict[int, str] = {}
    aliases = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        first = canonical.setdefault(id(tensor), name)
        if first != name:
            aliases[name] = first
    if type(module) in SUPPORTED_MODULES:  # a single layer: fx would trace its insides
        handler = SUPPORTED_MODULES[type(module)]
        return lambda params, buffers, *inputs: handler(module, "", {**buffers, **params},
                                                        *inputs)
    attributes = set(vars(module))
    try:
        graph = _Tracer().trace(module)
    except Exception as err:  # fx raises many types; the cause is kept
        raise UnsupportedOpError(
            f"torch.fx could not trace {type(module).__name__} ({type(err).__name__}: {err}); "
            "the converted route needs a forward without data-dependent Python control flow. "
            "Use backend=\"torch\"."
        ) from err
    finally:
        # fx stores tensors made in forward (torch.tensor(-1e9)) as new attributes of the
        # root module: taken out again, so the user's module is left as it was.
        traced = {name: vars(module).pop(name) for name in set(vars(module)) - attributes}
    modules = dict(module.named_modules())
    # Tensors read with get_attr other than parameters and float buffers (those come from
    # the dicts passed to apply) are constants: fx's traced constants, plain tensor
    # attributes, and integer buffers (the models' split passes only float buffers).
    passed = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    passed |= {name for name, b in module.named_buffers(remove_duplicate=False)
               if b.is_floating_point()}
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in passed:
            value = traced.get(node.target, module)
            if node.target not in traced:
                for part in node.target.split("."):
                    value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                raise _unsupported(f"attribute {node.target!r} of type {type(value).__name__}")
            constants[node.target] = _constant(value)
    # Check every node before running anything, so an unsupported op fails at once.
    for node in graph.nodes:
        if node.op == "call_module":
            _module_handler(modules[node.target])
        elif node.op == "call_function" and node.target not in SUPPORTED_FUNCTIONS:
            raise _unsupported(f"function {_function_name(node.target)}")
        elif node.op == "call_method" and node.target not in SUPPORTED_METHODS:
            raise _unsupported(f"tensor method Tensor.{node.target}")
    nodes = list(graph.nodes)

    def apply(params, buffers, *inputs):
        values = {**buffers, **params}
        values.update({alias: values[first] for alias, first in aliases.items()
                       if first in values})
        env: dict[str, Any] = {}
        args_iter = iter(inputs)

        def load(arg):
            return torch.fx.node.map_arg(arg, lambda n: env[n.name])

        for node in nodes:
            if node.op == "placeholder":
                try:
                    env[node.name] = next(args_iter)
                except StopIteration:
                    if node.args:  # a default value of forward
                        env[node.name] = node.args[0]
                    else:
                        raise TypeError(
                            f"{type(module).__name__}.forward needs input {node.target!r}; "
                            f"got {len(inputs)} inputs.") from None
            elif node.op == "get_attr":
                if node.target in values:
                    env[node.name] = values[node.target]
                elif node.target in constants:
                    env[node.name] = constants[node.target]
                else:
                    raise ValueError(
                        f"{type(module).__name__} reads {node.target!r}, which is missing from "
                        "the params and buffers passed to apply; pass every name of "
                        "module.named_parameters() and its floating-point named_buffers().")
            elif node.op == "call_module":
                target = modules[node.target]
                prefix = f"{node.target}." if node.target else ""
                env[node.name] = _module_handler(target)(target, prefix, values,
                                                         *load(node.args), **load(node.kwargs))
            elif node.op == "call_function":
                env[node.name] = SUPPORTED_FUNCTIONS[node.target](*load(node.args),
                                                                  **load(node.kwargs))
            elif node.op == "call_method":
                self_arg, *rest = load(node.args)
                env[node.name] = SUPPORTED_METHODS[node.target](self_arg, *rest,
                                                                **load(node.kwargs))
            elif node.op == "output":
                return load(node.args[0])
        raise ValueError(f"the traced graph of {type(module).__name__} has no output node.")

    return apply
