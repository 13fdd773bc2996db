"""ATen ops that make, cast, reshape, index and scatter tensors.

Sizes arrive as Python ints (the programs are exported per input shape), devices and
memory formats are JAX's placement business and are ignored. Results are cast by the
interpreter to the dtype torch recorded, so factories may leave the dtype to it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .base import dtype as jax_dtype
from .base import op, unsupported

_PLACEMENT = ("layout", "device", "pin_memory", "memory_format", "non_blocking")


def _ignore(kwargs):
    unknown = set(kwargs) - set(_PLACEMENT)
    if unknown:
        raise unsupported(f"keyword arguments {sorted(unknown)}")


# --- no-ops, copies and casts ---------------------------------------------------------------

@op("_assert_tensor_metadata.default", "_assert_scalar.default",
    "sym_constrain_range_for_size.default", "_assert_async.msg")
def nothing(*args, **kwargs):
    return None


@op("clone.default", "alias.default", "lift_fresh_copy.default", "contiguous.default")
def identity(self, **kwargs):
    return self


@op("detach.default")
def detach(self):
    return jax.lax.stop_gradient(self)


@op("_to_copy.default")
def to_copy(self, *, dtype=None, **kwargs):  # noqa: A002 - ATen's name
    _ignore(kwargs)
    return self if dtype is None else self.astype(jax_dtype(dtype))


@op("copy.default")
def copy(self, src, non_blocking=False):
    return jnp.broadcast_to(src, self.shape).astype(self.dtype)


@op("fill.Scalar", "fill.Tensor")
def fill(self, value):
    return jnp.full_like(self, value)


# --- factories ------------------------------------------------------------------------------

@op("full.default")
def full(size, fill_value, *, dtype=None, **kwargs):  # noqa: A002
    _ignore(kwargs)
    return jnp.full(tuple(size), fill_value, jax_dtype(dtype))


@op("full_like.default")
def full_like(self, fill_value, *, dtype=None, **kwargs):  # noqa: A002
    _ignore(kwargs)
    return jnp.full(self.shape, fill_value, jax_dtype(dtype) or self.dtype)


@op("empty.memory_format", "zeros.default")
def empty(size, *, dtype=None, **kwargs):  # noqa: A002 - torch's values are undefined: 0
    return full(size, 0, dtype=dtype, **kwargs)


@op("empty_strided.default")
def empty_strided(size, stride, *, dtype=None, **kwargs):  # noqa: A002
    return full(size, 0, dtype=dtype, **kwargs)


@op("empty_like.default", "zeros_like.default")
def empty_like(self, *, dtype=None, **kwargs):  # noqa: A002
    return full_like(self, 0, dtype=dtype, **kwargs)


@op("ones_like.default")
def ones_like(self, *, dtype=None, **kwargs):  # noqa: A002
    return full_like(self, 1, dtype=dtype, **kwargs)


@op("scalar_tensor.default")
def scalar_tensor(s, *, dtype=None, **kwargs):  # noqa: A002
    return full((), s, dtype=dtype, **kwargs)


@op("arange.start_step", "arange.start", "arange.default")
def arange(start, end=None, step=1, *, dtype=None, **kwargs):  # noqa: A002
    _ignore(kwargs)
    return jnp.arange(start, end, step, dtype=jax_dtype(dtype))


@op("sym_size.int")
def sym_size(self, dim):
    return self.shape[dim]


@op("sym_numel.default")
def sym_numel(self):
    return math.prod(self.shape)


@op("sym_stride.int")
def sym_stride(self, dim):  # strides of the contiguous layout torch traced
    return math.prod(self.shape[dim % self.ndim + 1:])


# --- shapes ---------------------------------------------------------------------------------

@op("view.default", "_unsafe_view.default", "reshape.default")
def view(self, size):
    return self.reshape(tuple(size))


@op("permute.default")
def permute(self, dims):
    return jnp.transpose(self, tuple(dims))


@op("transpose.int")
def transpose(self, dim0, dim1):
    return jnp.swapaxes(self, dim0, dim1)


@op("t.default")
def t(self):
    return self.T


@op("expand.default")
def expand(self, size, *, implicit=False):
    lead = len(size) - self.ndim
    shape = tuple(s if s != -1 else self.shape[i - lead] for i, s in enumerate(size))
    return jnp.broadcast_to(self, shape)


@op("squeeze.dims", "squeeze.dim", "squeeze.default")
def squeeze(self, dim=None):
    dims = range(self.ndim) if dim is None else ([dim] if isinstance(dim, int) else dim)
    return jnp.squeeze(self, tuple(d % self.ndim for d in dims if self.shape[d] == 1))


@op("unsqueeze.default")
def unsqueeze(self, dim):
    return jnp.expand_dims(self, dim % (self.ndim + 1))


def _at(dim: int, index) -> tuple:
    return (slice(None),) * dim + (index,)


@op("slice.Tensor")
def slice_(self, dim=0, start=None, end=None, step=1):
    return self[_at(dim % self.ndim, slice(start, end, step))]


@op("select.int")
def select(self, dim, index):
    return self[_at(dim % self.ndim, index)]


@op("slice_scatter.default")
def slice_scatter(self, src, dim=0, start=None, end=None, step=1):
    return self.at[_at(dim % self.ndim, slice(start, end, step))].set(src)


@op("select_scatter.default")
def select_scatter(self, src, dim, index):
    return self.at[_at(dim % self.ndim, index)].set(src)


@op("diagonal.default")
def diagonal(self, offset=0, dim1=0, dim2=1):
    return jnp.diagonal(self, offset, dim1, dim2)


@op("cat.default")
def cat(tensors, dim=0):
    # torch's legacy rule: 1-D empty tensors may join tensors of any rank
    kept = [x for x in tensors if not (x.ndim == 1 and x.shape[0] == 0)] or list(tensors)
    return jnp.concatenate(kept, axis=dim % kept[0].ndim)


@op("split_with_sizes.default")
def split_with_sizes(self, split_sizes, dim=0):
    return jnp.split(self, list(np.cumsum(split_sizes)[:-1]), axis=dim)


@op("split.Tensor")
def split(self, split_size, dim=0):
    return jnp.split(self, list(range(split_size, self.shape[dim], split_size)), axis=dim)


@op("unbind.int")
def unbind(self, dim=0):
    return [jnp.squeeze(part, dim) for part in jnp.split(self, self.shape[dim], axis=dim)]


@op("flip.default")
def flip(self, dims):
    return jnp.flip(self, tuple(dims))


@op("roll.default")
def roll(self, shifts, dims=()):
    if not dims:
        return jnp.roll(self.reshape(-1), tuple(shifts)).reshape(self.shape)
    return jnp.roll(self, tuple(shifts), tuple(dims))


@op("repeat.default")
def repeat(self, repeats):
    return jnp.tile(self, tuple(repeats))


@op("constant_pad_nd.default")
def constant_pad_nd(self, pad, value=0):
    # pad = (last_lo, last_hi, second_last_lo, ...); negative entries crop (lax.pad does)
    pairs = [(0, 0, 0)] * (self.ndim - len(pad) // 2)
    pairs += [(pad[i], pad[i + 1], 0) for i in reversed(range(0, len(pad), 2))]
    return jax.lax.pad(self, jnp.asarray(value, self.dtype), pairs)


def _pad_mode(mode):
    def pad(self, padding):
        pairs = [(0, 0)] * (self.ndim - len(padding) // 2)
        pairs += [(padding[i], padding[i + 1]) for i in reversed(range(0, len(padding), 2))]
        return jnp.pad(self, pairs, mode=mode)

    return pad


op("reflection_pad1d.default", "reflection_pad2d.default", "reflection_pad3d.default")(
    _pad_mode("reflect"))
op("replication_pad1d.default", "replication_pad2d.default", "replication_pad3d.default")(
    _pad_mode("edge"))


# --- indexing -------------------------------------------------------------------------------

def _indices(indices) -> tuple:
    """ATen's ``Tensor?[] indices`` as a numpy index: None is a full slice. numpy and torch
    place broadcast index dimensions alike (in place when adjacent, else first)."""
    for index in indices:
        if index is not None and index.dtype == jnp.bool_:
            raise unsupported("indexing with a boolean mask", " (its output size depends on "
                              "the data); use torch.where(mask, x, other)")
    return tuple(slice(None) if index is None else index for index in indices)


@op("index.Tensor", "_unsafe_index.Tensor")
def index(self, indices):
    return self[_indices(indices)]


@op("index_put.default", "_unsafe_index_put.default")
def index_put(self, indices, values, accumulate=False):
    at = self.at[_indices(indices)]
    return at.add(values) if accumulate else at.set(values)


@op("index_select.default")
def index_select(self, dim, index):
    return jnp.take(self, index, axis=dim)


def _grid(index, dim):
    """Full index tuple addressing ``index``'s positions with ``index`` along ``dim``."""
    grid = list(jnp.meshgrid(*[jnp.arange(n) for n in index.shape], indexing="ij"))
    grid[dim % index.ndim] = index
    return tuple(grid)


@op("gather.default")
def gather(self, dim, index, *, sparse_grad=False):
    return self[_grid(index, dim)]


@op("scatter.src", "scatter.value")
def scatter(self, dim, index, src=None, value=None):
    src = value if src is None else src
    if hasattr(src, "shape") and src.shape != index.shape:
        src = src[tuple(slice(0, n) for n in index.shape)]
    return self.at[_grid(index, dim)].set(src)


@op("scatter_add.default")
def scatter_add(self, dim, index, src):
    return self.at[_grid(index, dim)].add(src[tuple(slice(0, n) for n in index.shape)])


@op("scatter_reduce.two")
def scatter_reduce(self, dim, index, src, reduce, *, include_self=True):
    src = src[tuple(slice(0, n) for n in index.shape)]
    where = _grid(index, dim)
    hits = jnp.zeros(self.shape, self.dtype).at[where].add(1)
    if reduce == "mean":
        base = self if include_self else jnp.where(hits > 0, 0, self)
        total = base.at[where].add(src)
        return jnp.where(hits > 0, total / (hits + int(include_self)), self)
    methods = {"sum": "add", "prod": "multiply", "amax": "max", "amin": "min"}
    if reduce not in methods:
        raise unsupported(f"scatter_reduce with reduce={reduce!r}")
    if not include_self:  # the reduction starts from its identity where src lands
        identity = {"sum": 0, "prod": 1, "amax": -jnp.inf, "amin": jnp.inf}[reduce]
        self = jnp.where(hits > 0, jnp.asarray(identity, self.dtype), self)
    return getattr(self.at[where], methods[reduce])(src)
