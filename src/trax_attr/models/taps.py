"""Layer taps for Flax models: report each covered layer's input and output to a tap.

The kronecker projector (:mod:`trax_attr.projection.kronecker`) needs, for every layer whose kernel
it projects, the layer's input x and output y, and a hook to add a perturbation to y. A
model reports them through ``apply_tapped(params, state, tap, *inputs)``, which runs the
model and replaces each covered layer's output by ``tap(kernel_path, x, y)`` (the tap
returns y plus a zero perturbation whose cotangent is ∂f/∂y). This module builds
``apply_tapped`` for flax.linen and flax.nnx models.

Covered layers (``kernel_path`` is the leaf path of their kernel, as :func:`select`
names it), in the form the tap receives them:

* ``nn.Dense`` / ``nnx.Linear``: x ``(..., d_in)``, y ``(..., d_out)``.
* ``nn.DenseGeneral`` / ``nnx.LinearGeneral`` without batch axes: the contracted axes of
  x moved last and flattened to ``(..., d_in)``, the feature axes of y flattened to
  ``(..., d_out)``; the kernel ``(*in_shape, *out_shape)`` is read as ``(d_in, d_out)``.
  (``nnx.MultiHeadAttention``'s projections are such layers.)
* ``nn.Embed`` / ``nnx.Embed``: x the integer ids ``(...)`` (never a one-hot), y the
  vectors ``(..., features)``; ``attend(q)`` (y = q Eᵀ, tied output layers) is tapped with
  ``transposed=True``: x = q ``(..., features)``, y ``(..., num_embeddings)``.
* ``nn.Conv`` / ``nnx.Conv`` (any number of spatial axes, strides, kernel dilation) with
  ``feature_group_count=1`` and padding 'SAME', 'VALID' or explicit pairs: x the im2col patches
  (``jax.lax.conv_general_dilated_patches``) ``(..., window·C_in)`` in the kernel's
  ``(*window, C_in)`` order, y ``(..., C_out)``.

Exact layer types only (a subclass may change the maths), with flax's own product (no
custom ``dot_general`` or ``conv_general_dilated``), and for Conv no mask and no input
dilation. Any other layer, and any covered kind in a configuration not listed (e.g.
'CIRCULAR' padding, feature groups, batch axes), is not tapped: its parameters take the
dense fallback projection.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["linen_apply_tapped", "nnx_apply_tapped"]


# --- the layer kinds, shared by linen and nnx -----------------------------------------
def _normalize_axes(axes, ndim):
    return tuple(int(a) % ndim for a in axes)


def _tap_general(tap, path, x, y, axis, n_features):
    """DenseGeneral: contracted axes of x last and flattened, features of y flattened."""
    axis = _normalize_axes(axis, x.ndim)
    n = len(axis)
    x2 = jnp.moveaxis(x, axis, tuple(range(x.ndim - n, x.ndim)))
    x2 = x2.reshape(x2.shape[:x.ndim - n] + (-1,))
    lead = y.shape[:y.ndim - n_features]
    y2 = tap(path, x2, y.reshape(lead + (-1,)))
    return y2.reshape(y.shape)


def _conv_patches(x, kernel_shape, strides, padding, kernel_dilation):
    """im2col of a channels-last conv input: (N, *spatial, C) -> (N, *out, window·C) in
    the kernel's (*window, C) row-major order; padding 'SAME', 'VALID' or pairs."""
    window = tuple(kernel_shape[:-2])
    nd = len(window)
    if nd > 6:
        return None
    lhs = "N" + "HWDXYZ"[:nd] + "C"
    spec = (lhs, "HWDXYZ"[:nd] + "IO", lhs)
    patches = jax.lax.conv_general_dilated_patches(
        x, window, strides, padding, rhs_dilation=kernel_dilation,
        dimension_numbers=spec, precision=jax.lax.Precision.HIGHEST)
    # patches' features are ordered (C, *window); the kernel flattens (*window, C)
    c = x.shape[-1]
    out = patches.shape[:-1]
    patches = patches.reshape(out + (c, math.prod(window)))
    return jnp.swapaxes(patches, -1, -2).reshape(out + (-1,))


def _tap_conv(tap, path, x, y, kernel_shape, strides, padding, kernel_dilation):
    """Conv: x as patches when the configuration is covered, y untouched otherwise."""
    nd = len(kernel_shape) - 2
    batch = x.shape[:x.ndim - nd - 1]
    xf = x.reshape((-1,) + x.shape[x.ndim - nd - 1:])
    patches = _conv_patches(xf, kernel_shape, strides, padding, kernel_dilation)
    if patches is None:
        return y
    patches = patches.reshape(batch + patches.shape[1:])
    return tap(path, patches, y)


def _broadcast(v, nd):
    if v is None:
        return (1,) * nd
    if isinstance(v, int):
        return (v,) * nd
    return tuple(v)


def _canonical_padding(padding, nd):
    """Flax padding -> 'SAME', 'VALID', a tuple of pairs, or None (not covered)."""
    if isinstance(padding, str):
        return padding if padding in ("SAME", "VALID") else None
    if isinstance(padding, int):
        return ((padding, padding),) * nd
    pads = []
    for p in padding:
        if isinstance(p, int):
            pads.append((p, p))
        elif len(p) == 2:
            pads.append((int(p[0]), int(p[1])))
        else:
            return None
    return tuple(pads) if len(pads) == nd else None


# --- flax.linen ------------------------------------------------------------------------
def linen_apply_tapped(apply):
    """``apply_tapped(params, state, tap, *inputs)`` of a linen model's ``apply``,
    through ``nn.intercept_methods``."""
    from flax import linen

    def interceptor(next_fun, args, kwargs, context, tap):
        module, name = context.module, context.method_name
        kind = type(module)
        prefix = "/".join(module.path)
        if (kind in (linen.Dense, linen.DenseGeneral, linen.Conv)
                and (module.__dict__.get("dot_general") is not None
                     or module.__dict__.get("dot_general_cls") is not None
                     or module.__dict__.get("conv_general_dilated") is not None
                     or module.__dict__.get("conv_general_dilated_cls") is not None)):
            return next_fun(*args, **kwargs)  # a custom product: not known to be x W
        if kind is linen.Dense and name == "__call__":
            y = next_fun(*args, **kwargs)
            return tap(_leaf(prefix, "kernel"), _first(args, kwargs, "inputs"), y)
        if kind is linen.DenseGeneral and name == "__call__" and not module.batch_dims:
            y = next_fun(*args, **kwargs)
            axis = module.axis if not isinstance(module.axis, int) else (module.axis,)
            features = module.features if not isinstance(module.features, int) else (
                module.features,)
            return _tap_general(tap, _leaf(prefix, "kernel"), _first(args, kwargs, "inputs"), y,
                                axis, len(features))
        if kind is linen.Embed and name in ("__call__", "attend"):
            y = next_fun(*args, **kwargs)
            if name == "attend":
                return tap(_leaf(prefix, "embedding"), _first(args, kwargs, "query"), y,
                           transposed=True)
            ids = _first(args, kwargs, "inputs")
            if module.num_embeddings == 1:  # flax broadcasts row 0 to every id
                ids = jnp.zeros_like(ids)
            return tap(_leaf(prefix, "embedding"), ids, y)
        if kind is linen.Conv and name == "__call__":
            nd = _conv_nd(module.kernel_size)
            padding = _canonical_padding(module.padding, nd)
            y = next_fun(*args, **kwargs)
            if (padding is None or module.feature_group_count != 1 or module.mask is not None
                    or _broadcast(module.input_dilation, nd) != (1,) * nd):
                return y
            x = _first(args, kwargs, "inputs")
            window = _broadcast(module.kernel_size, nd)
            return _tap_conv(tap, _leaf(prefix, "kernel"), x, y,
                             window + (x.shape[-1], module.features),
                             _broadcast(module.strides, nd), padding,
                             _broadcast(module.kernel_dilation, nd))
        return next_fun(*args, **kwargs)

    def apply_tapped(params, state, tap, *inputs):
        def intercept(next_fun, args, kwargs, context):
            return interceptor(next_fun, args, kwargs, context, tap)

        with linen.intercept_methods(intercept):
            return apply(params, state, *inputs)

    return apply_tapped


def _leaf(prefix: str, name: str) -> str:
    """The leaf path of a layer's parameter (a model that is itself the layer: no prefix)."""
    return f"{prefix}/{name}" if prefix else name


def _first(args, kwargs, name):
    return args[0] if args else kwargs[name]


def _conv_nd(kernel_size) -> int:
    return 1 if isinstance(kernel_size, int) else len(kernel_size)


# --- flax.nnx --------------------------------------------------------------------------
# nnx layers are called as module(x), looked up on the class. apply_tapped merges a private
# copy of the model for each call and turns each covered layer of that copy into an
# instance of a tapped subclass (the same layer, whose __call__ reports to the tap); the
# classes of flax itself and every other instance are left alone.
def _nnx_tapped_classes():
    """{covered nnx class: its tapped subclass}; the subclasses read ``_trax_tap`` and
    ``_trax_path``, set on the instance by :func:`nnx_apply_tapped`."""
    from flax import nnx

    class Linear(nnx.Linear):
        def __call__(self, inputs, *args, **kwargs):
            y = super().__call__(inputs, *args, **kwargs)
            if self.dot_general is not jax.lax.dot_general:
                return y  # a custom product: not known to be x W
            return self._trax_tap(_leaf(self._trax_path, "kernel"), inputs, y)

    class LinearGeneral(nnx.LinearGeneral):
        def __call__(self, inputs, *args, **kwargs):
            y = super().__call__(inputs, *args, **kwargs)
            if self.batch_axis or self.dot_general is not None \
                    or self.dot_general_cls is not None:
                return y
            return _tap_general(self._trax_tap, _leaf(self._trax_path, "kernel"), inputs, y,
                                self.axis, len(self.out_features))

    class Embed(nnx.Embed):
        def __call__(self, inputs, *args, **kwargs):
            y = super().__call__(inputs, *args, **kwargs)
            ids = jnp.zeros_like(inputs) if self.num_embeddings == 1 else inputs
            return self._trax_tap(_leaf(self._trax_path, "embedding"), ids, y)

        def attend(self, query, *args, **kwargs):
            y = super().attend(query, *args, **kwargs)
            return self._trax_tap(_leaf(self._trax_path, "embedding"), query, y, transposed=True)

    class Conv(nnx.Conv):
        def __call__(self, inputs, *args, **kwargs):
            y = super().__call__(inputs, *args, **kwargs)
            nd = len(self.kernel_size)
            padding = _canonical_padding(self.padding, nd)
            if (padding is None or self.feature_group_count != 1 or self.mask is not None
                    or self.conv_general_dilated is not jax.lax.conv_general_dilated
                    or _broadcast(self.input_dilation, nd) != (1,) * nd):
                return y
            return _tap_conv(self._trax_tap, _leaf(self._trax_path, "kernel"), inputs, y,
                             tuple(self.kernel_shape), _broadcast(self.strides, nd),
                             padding, _broadcast(self.kernel_dilation, nd))

    return {nnx.Linear: Linear, nnx.LinearGeneral: LinearGeneral, nnx.Embed: Embed,
            nnx.Conv: Conv}


def nnx_apply_tapped(graphdef):
    """``apply_tapped(params, state, tap, *inputs)`` of an nnx model split into
    ``graphdef``, params and state."""
    from flax import nnx

    tapped = _nnx_tapped_classes()

    def apply_tapped(params, state, tap, *inputs):
        module = nnx.merge(graphdef, params, state)  # a private copy for this call
        for path, node in nnx.iter_graph(module):
            subclass = tapped.get(type(node))  # exact types: a subclass may change the maths
            if subclass is not None:
                node.__class__ = subclass
                object.__setattr__(node, "_trax_tap", tap)
                object.__setattr__(node, "_trax_path", "/".join(str(p) for p in path))
        return module(*inputs)

    return apply_tapped
