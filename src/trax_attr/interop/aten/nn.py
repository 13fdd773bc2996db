"""ATen's layers: matmuls, convolution, normalisation, pooling, resampling, embedding,
attention. Convolutions and pools take torch's NCHW layout and weights (OIHW).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp

from .base import HIGHEST, op, tuple_of, unsupported


@op("mm.default", "bmm.default", "matmul.default")
def mm(self, mat2):
    return jnp.matmul(self, mat2, precision=HIGHEST)


@op("addmm.default", "baddbmm.default")
def addmm(self, mat1, mat2, *, beta=1, alpha=1):
    product = jnp.matmul(mat1, mat2, precision=HIGHEST)
    product = product if alpha == 1 else alpha * product
    return product if beta == 0 else product + (self if beta == 1 else beta * self)


# XLA:CPU runs convolutions of few output pixels ~50x below its matmul rate (a 3x3 conv
# of 256 channels on 2x2 pixels: 0.7 GFLOP/s, 6.5 vs 128 ms per batch of 16, where torch
# takes 3), and vmap turns per-example weight gradients into grouped convolutions, slower
# still. Below this many output pixels (and for every 1x1 kernel) a convolution is
# computed as one dot of shifted input slices with the kernel ("im2col"): a plain matmul
# forward, a batched one per example. Above it the patches cost more memory traffic than
# the convolution (64 channels on 32x32: 524 vs 112 ms): lax.conv. benchmarks/interop_resnet.py.
_DOT_MAX_PIXELS = 64


def _conv_as_dot(x, w, stride, padding, dilation, groups):
    """conv_general_dilated(x, w) for NC... x and OI... w, as slices and one einsum."""
    k = w.shape[2:]
    out = [(size + 2 * p - d * (kk - 1) - 1) // s + 1
           for size, kk, s, p, d in zip(x.shape[2:], k, stride, padding, dilation)]
    x = jnp.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding])
    taps = []
    for offset in itertools.product(*[range(kk) for kk in k]):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                      for o, d, m, s in zip(offset, dilation, out, stride))
        taps.append(x[(slice(None), slice(None)) + index])
    cols = jnp.stack(taps, axis=2)                                # (B, C, K, *out)
    b, c = cols.shape[:2]
    cols = cols.reshape((b, groups, c // groups) + cols.shape[2:])
    o = w.shape[0]
    w = w.reshape((groups, o // groups, c // groups, -1))         # (G, O/G, C/G, K)
    y = jnp.einsum("bgck...,gock->bgo...", cols, w, precision=HIGHEST)
    return y.reshape((b, o) + tuple(out))


@op("convolution.default")
def convolution(input, weight, bias, stride, padding, dilation, transposed,  # noqa: A002
                output_padding, groups):
    n = weight.ndim - 2
    spatial = "DHW"[-n:] if n <= 3 else None
    if spatial is None:
        raise unsupported(f"a {n}-d convolution")
    dims = ("NC" + spatial, "OI" + spatial, "NC" + spatial)
    stride, padding, dilation = (tuple_of(v, n) for v in (stride, padding, dilation))
    if not transposed:
        pixels = math.prod((size + 2 * p - d * (kk - 1) - 1) // s + 1 for size, kk, s, p, d
                           in zip(input.shape[2:], weight.shape[2:], stride, padding, dilation))
        if pixels <= _DOT_MAX_PIXELS or math.prod(weight.shape[2:]) == 1:
            y = _conv_as_dot(input, weight, stride, padding, dilation, groups)
        else:
            y = jax.lax.conv_general_dilated(
                input, weight, window_strides=stride, padding=[(p, p) for p in padding],
                rhs_dilation=dilation, feature_group_count=groups, dimension_numbers=dims,
                precision=HIGHEST)
    else:
        # the gradient of a convolution: dilate the input by the stride, pad by what the
        # forward cropped, convolve with the flipped kernel, in/out channels swapped per group
        k = weight.shape[2:]
        cin, cout_g = weight.shape[:2]
        w = weight.reshape((groups, cin // groups, cout_g) + k).swapaxes(1, 2)
        w = jnp.flip(w.reshape((groups * cout_g, cin // groups) + k), tuple(range(2, 2 + n)))
        out_pad = tuple_of(output_padding, n)
        pads = [(d * (kk - 1) - p, d * (kk - 1) - p + op_)
                for kk, p, d, op_ in zip(k, padding, dilation, out_pad)]
        y = jax.lax.conv_general_dilated(
            input, w, window_strides=(1,) * n, padding=pads, lhs_dilation=stride,
            rhs_dilation=dilation, feature_group_count=groups, dimension_numbers=dims,
            precision=HIGHEST)
    return y if bias is None else y + bias.reshape((1, -1) + (1,) * n)


def _per_channel(x, v):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


@op("_native_batch_norm_legit_no_training.default")
def batch_norm(input, weight, bias, running_mean, running_var, momentum, eps):  # noqa: A002
    y = (input - _per_channel(input, running_mean)) * jax.lax.rsqrt(
        _per_channel(input, running_var) + eps)
    if weight is not None:
        y = y * _per_channel(input, weight)
    if bias is not None:
        y = y + _per_channel(input, bias)
    return y, None, None  # torch returns empty tensors for the saved statistics


@op("_native_batch_norm_legit.default", "_native_batch_norm_legit.no_stats")
def batch_norm_legit(input, weight, bias, *rest):  # noqa: A002
    running = rest[:2] if len(rest) == 5 else None
    training = rest[-3]
    if training or running is None:
        raise unsupported("batch_norm with batch statistics (training mode or "
                          "track_running_stats=False)",
                          "; TRAK evaluates BatchNorm with its running statistics")
    return batch_norm(input, weight, bias, *running, *rest[-2:])


@op("native_layer_norm.default")
def layer_norm(input, normalized_shape, weight, bias, eps):  # noqa: A002
    axes = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    mean = input.mean(axes, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(input - mean).mean(axes, keepdims=True) + eps)
    y = (input - mean) * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, rstd


@op("native_group_norm.default")
def group_norm(input, weight, bias, N, C, HxW, group, eps):  # noqa: A002, N803
    x = input.reshape((N, group, -1))
    mean = x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
    y = ((x - mean) * rstd).reshape(input.shape)
    if weight is not None:
        y = y * _per_channel(input, weight)
    if bias is not None:
        y = y + _per_channel(input, bias)
    return y, mean.reshape(N, group), rstd.reshape(N, group)


@op("embedding.default")
def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if scale_grad_by_freq:
        raise unsupported("embedding with scale_grad_by_freq=True")
    rows = jnp.take(weight, indices, axis=0)
    if padding_idx is None or padding_idx < 0:
        return rows
    # torch's gradient leaves the padding row untouched: so do we
    pad = (indices == padding_idx)[..., None]
    return jnp.where(pad, jax.lax.stop_gradient(rows), rows)


@op("native_dropout.default")
def native_dropout(input, p, train):  # noqa: A002
    if train:
        raise unsupported("dropout in training mode", "; the module is converted in eval mode")
    return input, jnp.ones(input.shape, bool)


@op("scaled_dot_product_attention.default")
def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
         enable_gqa=False):
    if dropout_p:
        raise unsupported(f"scaled_dot_product_attention with dropout_p={dropout_p}")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = (jnp.repeat(t, repeats, axis=-3) for t in (key, value))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = jnp.matmul(query, jnp.swapaxes(key, -1, -2), precision=HIGHEST) * scale
    if is_causal:
        lq, lk = query.shape[-2], key.shape[-2]
        attn_mask = jnp.tril(jnp.ones((lq, lk), bool))
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            logits = jnp.where(attn_mask, logits, -jnp.inf)
        else:
            logits = logits + attn_mask
    # torch's math kernel gives 0, not NaN, for a query that may attend nowhere (a padded
    # row); a NaN there would reach every gradient through the backward pass
    anywhere = jnp.any(logits > -jnp.inf, axis=-1, keepdims=True)
    weights = jax.nn.softmax(jnp.where(anywhere, logits, 0.0), axis=-1)
    return jnp.matmul(jnp.where(anywhere, weights, 0.0), value, precision=HIGHEST)


# --- pooling --------------------------------------------------------------------------------

def _windows(shape, kernel, stride, padding, dilation, ceil_mode):
    """Per spatial axis: (low pad, high pad, output size), torch's output-size rule."""
    out = []
    for size, k, s, p, d in zip(shape, kernel, stride, padding, dilation):
        span = size + 2 * p - d * (k - 1) - 1
        n = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (n - 1) * s >= size + p:  # the last window must start in the input
            n -= 1
        out.append((p, (n - 1) * s + d * (k - 1) + 1 - size - p, n))
    return out


def _pool_args(x, kernel_size, stride, padding, dilation, n):
    kernel = tuple_of(kernel_size, n)
    stride = kernel if not stride else tuple_of(stride, n)
    return kernel, stride, tuple_of(padding, n), tuple_of(dilation, n)


def _pad(x, pairs, value):
    """Pad (or crop, where negative) the last len(pairs) axes of x with value."""
    lead = [(0, 0, 0)] * (x.ndim - len(pairs))
    return jax.lax.pad(x, jnp.asarray(value, x.dtype), lead + [(lo, hi, 0) for lo, hi in pairs])


def _reduce(x, init, fn, kernel, stride, dilation=None):
    lead = (1,) * (x.ndim - len(kernel))
    return jax.lax.reduce_window(x, init, fn, lead + kernel, lead + stride, "VALID",
                                 window_dilation=None if dilation is None else lead + dilation)


def _dilated_max(x, kernel, stride, dilation):
    """reduce_window max with window dilation, as a max over strided slices: JAX has no
    VJP for dilated max windows."""
    n = len(kernel)
    out = [(size - d * (k - 1) - 1) // s + 1
           for size, k, s, d in zip(x.shape[-n:], kernel, stride, dilation)]
    lead = (slice(None),) * (x.ndim - n)
    taps = [x[lead + tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                           for o, d, m, s in zip(offset, dilation, out, stride))]
            for offset in itertools.product(*[range(k) for k in kernel])]
    return functools.reduce(jnp.maximum, taps)


def _max_pool(n):
    def pool(self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        kernel, stride, padding, dilation = _pool_args(self, kernel_size, stride, padding,
                                                       dilation, n)
        wins = _windows(self.shape[-n:], kernel, stride, padding, dilation, ceil_mode)
        padded = _pad(self, [(lo, hi) for lo, hi, _ in wins], -jnp.inf)
        # the indices: refused by the converter if anything reads them
        if all(d == 1 for d in dilation):
            return _reduce(padded, -jnp.inf, jax.lax.max, kernel, stride), None
        return _dilated_max(padded, kernel, stride, dilation), None

    return pool


op("max_pool2d_with_indices.default")(_max_pool(2))
op("max_pool3d_with_indices.default")(_max_pool(3))


def _avg_pool(n):
    def pool(self, kernel_size, stride=(), padding=0, ceil_mode=False,
             count_include_pad=True, divisor_override=None):
        kernel, stride, padding, _ = _pool_args(self, kernel_size, stride, padding, 1, n)
        wins = _windows(self.shape[-n:], kernel, stride, padding, (1,) * n, ceil_mode)
        pairs = [(lo, hi) for lo, hi, _ in wins]
        total = _reduce(_pad(self, pairs, 0), 0.0, jax.lax.add, kernel, stride)
        if divisor_override:
            return total / divisor_override
        # torch counts the zero padding (if asked) but never the overhang of ceil_mode
        ones = jnp.ones(self.shape[-n:], self.dtype)
        if count_include_pad:
            ones = _pad(ones, [(p, p) for p in padding], 1)
            pairs = [(0, hi - p) for (_, hi), p in zip(pairs, padding)]
        count = _reduce(_pad(ones, pairs, 0), 0.0, jax.lax.add, kernel, stride)
        return total / count

    return pool


op("avg_pool1d.default")(_avg_pool(1))
op("avg_pool2d.default")(_avg_pool(2))
op("avg_pool3d.default")(_avg_pool(3))


def _bins(size: int, out: int, dtype):
    """(out, size) averaging matrix of torch's adaptive pooling: bin i covers
    [floor(i size / out), ceil((i + 1) size / out))."""
    i = jnp.arange(out)[:, None]
    j = jnp.arange(size)[None, :]
    inside = (j >= (i * size) // out) & (j < -(-((i + 1) * size) // out))
    return inside.astype(dtype) / inside.sum(1, keepdims=True).astype(dtype)


def _adaptive_avg_pool(n):
    def pool(self, output_size):
        for axis, out in zip(range(self.ndim - n, self.ndim), tuple_of(output_size, n)):
            size = self.shape[axis]
            if out == 1:
                self = self.mean(axis, keepdims=True)
            elif size % out == 0:
                shape = self.shape[:axis] + (out, size // out) + self.shape[axis + 1:]
                self = self.reshape(shape).mean(axis + 1)
            else:
                self = jnp.moveaxis(jnp.tensordot(self, _bins(size, out, self.dtype).T,
                                                  axes=([axis], [0]), precision=HIGHEST),
                                    -1, axis)
        return self

    return pool


op("adaptive_avg_pool1d.default")(_adaptive_avg_pool(1))
op("_adaptive_avg_pool2d.default")(_adaptive_avg_pool(2))
op("_adaptive_avg_pool3d.default")(_adaptive_avg_pool(3))


# --- resampling -----------------------------------------------------------------------------

def _sizes(x, output_size, scale_factors, n):
    if output_size is not None:
        return tuple(output_size), tuple(s / o for s, o in zip(x.shape[-n:], output_size))
    sizes = tuple(int(math.floor(s * f)) for s, f in zip(x.shape[-n:], scale_factors))
    return sizes, tuple(1.0 / f for f in scale_factors)


@op("upsample_nearest2d.vec", "upsample_nearest1d.vec", "upsample_nearest3d.vec")
def upsample_nearest(input, output_size, scale_factors):  # noqa: A002
    n = len(output_size if output_size is not None else scale_factors)
    sizes, scales = _sizes(input, output_size, scale_factors, n)
    for axis, (out, scale) in zip(range(input.ndim - n, input.ndim), zip(sizes, scales)):
        src = jnp.minimum(jnp.floor(jnp.arange(out) * scale).astype(jnp.int32),
                          input.shape[axis] - 1)
        input = jnp.take(input, src, axis=axis)
    return input


@op("upsample_bilinear2d.vec", "upsample_linear1d.vec", "upsample_trilinear3d.vec")
def upsample_linear(input, output_size, align_corners, scale_factors):  # noqa: A002
    n = len(output_size if output_size is not None else scale_factors)
    sizes, scales = _sizes(input, output_size, scale_factors, n)
    for axis, (out, scale) in zip(range(input.ndim - n, input.ndim), zip(sizes, scales)):
        size = input.shape[axis]
        i = jnp.arange(out, dtype=jnp.float32)
        if align_corners:
            src = i * ((size - 1) / (out - 1) if out > 1 else 0.0)
        else:
            src = jnp.maximum((i + 0.5) * scale - 0.5, 0.0)
        lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), size - 1)
        hi = jnp.minimum(lo + 1, size - 1)
        shape = [1] * input.ndim
        shape[axis] = out
        frac = (src - lo).astype(input.dtype).reshape(shape)
        input = (jnp.take(input, lo, axis=axis) * (1 - frac)
                 + jnp.take(input, hi, axis=axis) * frac)
    return input
