"""Reductions, scans, sorting and (log-)softmax as ATen defines them.

Ops that return an element (max.dim, sort, topk) gather it with the indices they return,
so the gradient flows to that one element, as in torch; amax / amin split it among ties,
as torch's do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import axes, op
from .base import dtype as jax_dtype


def _cast(self, dtype):
    return self if dtype is None else self.astype(jax_dtype(dtype))


@op("sum.dim_IntList", "sum.default")
def sum_(self, dim=None, keepdim=False, *, dtype=None):
    return jnp.sum(_cast(self, dtype), axis=axes(dim, self.ndim), keepdims=keepdim)


@op("mean.dim", "mean.default")
def mean(self, dim=None, keepdim=False, *, dtype=None):
    return jnp.mean(_cast(self, dtype), axis=axes(dim, self.ndim), keepdims=keepdim)


@op("prod.dim_int", "prod.default")
def prod(self, dim=None, keepdim=False, *, dtype=None):
    return jnp.prod(_cast(self, dtype), axis=axes(dim, self.ndim), keepdims=keepdim)


@op("amax.default", "max.default")
def amax(self, dim=(), keepdim=False):
    return jnp.max(self, axis=axes(dim, self.ndim), keepdims=keepdim)


@op("amin.default", "min.default")
def amin(self, dim=(), keepdim=False):
    return jnp.min(self, axis=axes(dim, self.ndim), keepdims=keepdim)


@op("any.dim", "any.dims", "any.default")
def any_(self, dim=None, keepdim=False):
    return jnp.any(self, axis=axes(dim, self.ndim), keepdims=keepdim)


@op("all.dim", "all.dims", "all.default")
def all_(self, dim=None, keepdim=False):
    return jnp.all(self, axis=axes(dim, self.ndim), keepdims=keepdim)


@op("argmax.default")
def argmax(self, dim=None, keepdim=False):
    return jnp.argmax(self, axis=dim, keepdims=keepdim)


@op("argmin.default")
def argmin(self, dim=None, keepdim=False):
    return jnp.argmin(self, axis=dim, keepdims=keepdim)


def _extreme(arg):
    def reduce(self, dim, keepdim=False):
        index = jnp.expand_dims(arg(self, axis=dim), dim)
        values = jnp.take_along_axis(self, index, axis=dim)
        if not keepdim:
            values, index = jnp.squeeze(values, dim), jnp.squeeze(index, dim)
        return values, index

    return reduce


op("max.dim")(_extreme(jnp.argmax))
op("min.dim")(_extreme(jnp.argmin))


@op("var.correction", "var.dim")
def var(self, dim=None, unbiased=None, keepdim=False, *, correction=None):
    # var.dim passes `unbiased` (a bool) where var.correction passes the correction (a number)
    correction = (1 if unbiased is None or unbiased else 0) if correction is None else correction
    return jnp.var(self, axis=axes(dim, self.ndim), ddof=correction, keepdims=keepdim)


@op("std.correction")
def std(self, dim=None, *, correction=None, keepdim=False):
    return jnp.sqrt(var(self, dim, correction=correction, keepdim=keepdim))


@op("cumsum.default")
def cumsum(self, dim, *, dtype=None):
    return jnp.cumsum(_cast(self, dtype), axis=dim)


@op("cumprod.default")
def cumprod(self, dim, *, dtype=None):
    return jnp.cumprod(_cast(self, dtype), axis=dim)


@op("logsumexp.default")
def logsumexp(self, dim, keepdim=False):
    return jax.nn.logsumexp(self, axis=axes(dim, self.ndim), keepdims=keepdim)


@op("_softmax.default")
def softmax(self, dim, half_to_float=False):
    return jax.nn.softmax(self, axis=dim)


@op("_log_softmax.default")
def log_softmax(self, dim, half_to_float=False):
    return jax.nn.log_softmax(self, axis=dim)


@op("linalg_vector_norm.default")
def vector_norm(self, ord=2, dim=None, keepdim=False, *, dtype=None):  # noqa: A002
    x = jnp.abs(_cast(self, dtype))
    axis = axes(dim, self.ndim)
    if ord == float("inf"):
        return jnp.max(x, axis=axis, keepdims=keepdim)
    if ord == float("-inf"):
        return jnp.min(x, axis=axis, keepdims=keepdim)
    if ord == 0:
        return jnp.sum(x != 0, axis=axis, keepdims=keepdim).astype(x.dtype)
    if ord == 1:
        return jnp.sum(x, axis=axis, keepdims=keepdim)
    total = jnp.sum(x ** ord, axis=axis, keepdims=keepdim)
    # torch's gradient of the norm at 0 is 0; sqrt's would be NaN there
    zero = total == 0
    root = jnp.where(zero, 1, total) ** (1 / ord)
    return jnp.where(zero, 0, root)


@op("sort.default", "sort.stable")
def sort(self, dim=-1, descending=False, *, stable=False):
    index = jnp.argsort(self, axis=dim, stable=True, descending=descending)
    return jnp.take_along_axis(self, index, axis=dim), index


@op("topk.default")
def topk(self, k, dim=-1, largest=True, sorted=True):  # noqa: A002
    moved = jnp.moveaxis(self, dim, -1)
    _, index = jax.lax.top_k(moved if largest else -moved, k)
    index = jnp.moveaxis(index, -1, dim)
    return jnp.take_along_axis(self, index, axis=dim), index
