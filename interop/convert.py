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


def _softmax(x, dim=None, *args, dtype=None, **kwargs):
    return jax.nn.softmax(x, axis=dim)


def _log_softmax(x, dim=None, *args, dtype=None, **kwargs):
    return jax.nn.log_softmax(x, axis=dim)


def _flatten(x, start_dim=0, end_dim=-1):
    start = start_dim % x.ndim
    end = end_dim % x.ndim
    return x.reshape(x.shape[:start] + (-1,) + x.shape[end + 1:])


def _shape_args(x, *shape):
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


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
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    operator.neg: operator.neg,
    operator.matmul: lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST),
    operator.getitem: operator.getitem,
    getattr: getattr,
}

SUPPORTED_METHODS: dict[str, Callable] = {
    "view": lambda x, *shape: x.reshape(_shape_args(x, *shape)),
    "reshape": lambda x, *shape: x.reshape(_shape_args(x, *shape)),
    "flatten": _flatten,
    "chunk": _chunk,
    "split": _split,
    "transpose": lambda x, a, b: jnp.swapaxes(x, a, b),
    "permute": lambda x, *dims: jnp.transpose(x, _shape_args(x, *dims)),
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
    nn.Softmax: _stateless(lambda m, x: jax.nn.softmax(x, axis=m.dim)),
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
    try:
        graph = _Tracer().trace(module)
    except Exception as err:  # fx raises many types; the cause is kept
        raise UnsupportedOpError(
            f"torch.fx could not trace {type(module).__name__} ({type(err).__name__}: {err}); "
            "the converted route needs a forward without data-dependent Python control flow. "
            "Use backend=\"torch\"."
        ) from err
    modules = dict(module.named_modules())
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
                if node.target not in values:
                    raise _unsupported(f"attribute {node.target!r} (neither a parameter nor a "
                                       "buffer)")
                env[node.name] = values[node.target]
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
