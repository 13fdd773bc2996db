"""Kronecker-structured projection: project layers without forming their gradient.

For a dense layer y_t = x_t W + b (W: ``(d_in, d_out)``) the per-example gradient of the
output f is G = Σ_t x_t δ_tᵀ, with x_t the layer's input at position t and δ_t = ∂f/∂y_t.
With P_in ``(d_in, r_in)`` and P_out ``(d_out, r_out)``

    (P_in ⊗ P_out)ᵀ vec(G) = vec(P_inᵀ G P_out) = Σ_t (P_inᵀ x_t) ⊗ (P_outᵀ δ_t),

so the layer's r_in·r_out features need only x_t and δ_t: G (d_in·d_out per example) is
never formed (the idea of LoGra, Choe et al. 2024). The same holds for every layer that
is a matrix product in disguise: an embedding lookup (x_t one-hot, so P_inᵀ x_t is the
row P_in[id_t], gathered, never a one-hot), its tied use y = x Eᵀ (``attend``: the roles
swap, Σ_t (P_inᵀ δ_t) ⊗ (P_outᵀ x_t)), DenseGeneral (axes flattened to 2-D) and a
convolution (x_t the im2col patch at output position t). Selected leaves that no such
layer covers (biases, norms, unsupported layers) fall back to the dense projector of
:mod:`trax_attr.projection` with ``fallback_dim`` columns.

The full matrix P is block diagonal: one block P_in ⊗ P_out per covered kernel (in the
order of the selected leaves), then the dense fallback block on the remaining leaves, and
φ = Pᵀ g / √d with d the total number of selected parameters, as for the dense path.
k = Σ_layers r_in·r_out + fallback_dim (fallback_dim only when fallback leaves exist).

Keys: with ``key = fold_in(key(seed), model_id)`` (:func:`projection_key`), the layer
whose kernel has path ``p`` uses ``h = crc32(p) & 0x7fffffff`` and
P_in = rows of ``rademacher(r_in).matrix_block(fold_in(fold_in(key, h), 0), ...)``,
P_out = same with ``r_out`` and ``fold_in(fold_in(key, h), 1)``; the fallback block is
the dense projector's matrix of ``key`` over the fallback leaves.

What a model must expose: a :class:`~trax_attr.Model` with
``apply_tapped(params, state, tap, *inputs)``, its ``apply`` that, on every layer it
reports, replaces the layer's output y by ``tap(kernel_path, x, y)`` and goes on with the
returned value (y plus a zero perturbation, whose cotangent is δ). ``kernel_path`` is the
kernel's leaf path as :func:`~trax_attr.gradients.select` names it; the kernel's entries,
read in row-major order, form a ``(d_in, d_out)`` matrix and

* ``tap(path, x, y)``: x ``(..., d_in)`` float, y ``(..., d_out)``, y = x W (+ b);
* ``tap(path, ids, y)``: ids ``(...)`` integer rows, y = W[ids] ``(..., d_out)``;
* ``tap(path, x, y, transposed=True)``: x ``(..., d_out)``, y = x Wᵀ ``(..., d_in)``.

Leading axes are positions (summed over). A layer called several times sums its calls.
Every use of a covered kernel must go through a tapped call: a kernel that the output
also depends on otherwise (read directly, an untapped method) is detected on the traced
jaxpr and sent to the dense fallback with a warning. :func:`trax_attr.linen_model` and
:func:`trax_attr.models.nnx_model` provide ``apply_tapped``; the Flax layers they cover
(Dense / Linear, DenseGeneral / LinearGeneral, Embed and its ``attend``, Conv) are listed
in :mod:`trax_attr.models.taps`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import LayerInfo, check_compute_dtype, check_positive_int
from .dense import DenseProjector, rademacher, normal

__all__ = ["KroneckerProjector", "kronecker", "layer_keys", "structured_features",
           "covered_layers"]


@dataclasses.dataclass(frozen=True)
class KroneckerProjector:
    """Per-layer P_in ⊗ P_out projection with a dense fallback. Hashable (jit-static).

    Attributes:
      r_in, r_out: per-layer ranks; each covered kernel gives r_in·r_out features.
      fallback: the dense projector of the selected leaves no layer covers.
      dtype: compute dtype of the small projections.
      base: ``"rademacher"`` or ``"normal"``, the entries of P_in and P_out.
    """

    r_in: int
    r_out: int
    fallback: DenseProjector
    dtype: str = "float32"
    base: str = "rademacher"

    splittable = False   # φ's columns come from products of layer projections
    needs_layers = True  # k depends on which layers are covered: one example is traced

    def layer_info(self, f, checkpoint, example) -> LayerInfo:
        if example is None:
            raise ValueError(
                "the kronecker projector's k depends on the model's layers; it is known "
                "once a batch has been featurized (call featurize first).")
        example0 = jax.tree.map(lambda a: a[0], tuple(example))
        _, dims = covered_layers(f.task, f.model, f.selection, checkpoint.selected,
                                 checkpoint.rest, checkpoint.state, example0)
        covered = tuple((p, dims[p]) for p in f.selection.paths if p in dims)
        fallback = sum(s for p, s in zip(f.selection.paths, f.selection.sizes)
                       if p not in dims)
        return LayerInfo(f.selection.grad_dim, covered, int(fallback))

    def output_dim(self, layers: LayerInfo) -> int:
        per_layer = len(layers.covered) * self.r_in * self.r_out
        return per_layer + (int(self.fallback.proj_dim) if layers.fallback_dim else 0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "kronecker", "r_in": int(self.r_in), "r_out": int(self.r_out),
                "fallback": self.fallback.describe(), "dtype": self.dtype, "base": self.base}

    def layer_projector(self, r: int) -> DenseProjector:
        return DenseProjector(self.base, int(r), self.dtype, None, 0, self.fallback.generator)

    def cache(self, key, leaf_sizes):
        return None  # the structured path never holds a d x k matrix

    def features(self, f, checkpoint, batch, *, col_start=0, num_cols=None):
        if num_cols is not None:
            raise ValueError("the kronecker projector's columns cannot be split over devices; "
                             "use a mesh without a 'proj' axis.")
        return structured_features(self, f.task, f.model, f.selection, checkpoint.selected,
                                   checkpoint.rest, checkpoint.state, checkpoint.key, batch)

    def project(self, key, grads, cache=None, *, col_start=0, num_cols=None):
        raise TypeError(
            "the kronecker projector projects layers from their inputs and output "
            "cotangents, never from per-example gradients, so it needs a JAX model "
            "(flax.nnx, flax.linen or trax_attr.Model with apply_tapped); models whose "
            "gradients come from outside JAX take a dense projector such as "
            "trax_attr.rademacher(2048).")


def kronecker(r_in: int, r_out: int, *, fallback_dim: int = 512, dtype=jnp.float32,
              base: str = "rademacher", generator: str = "hash") -> KroneckerProjector:
    """Kronecker-structured projector: r_in·r_out features per covered layer (dense,
    embedding, convolution; see the module docstring), plus ``fallback_dim`` dense
    features for the other selected leaves (biases, norms, other layers)."""
    r_in = check_positive_int("r_in", r_in, "e.g. 16.")
    r_out = check_positive_int("r_out", r_out, "e.g. 16.")
    if base not in ("rademacher", "normal"):
        raise ValueError(f"base={base!r} is not known; use 'rademacher' or 'normal'.")
    make = rademacher if base == "rademacher" else normal
    fb = make(fallback_dim, dtype=dtype, max_cache_bytes=0, generator=generator)
    return KroneckerProjector(r_in, r_out, fb, check_compute_dtype(dtype), base)


def layer_keys(key: jax.Array, path: str) -> tuple[jax.Array, jax.Array]:
    """(key of P_in, key of P_out) of the layer whose kernel path is ``path``."""
    layer = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(layer, 0), jax.random.fold_in(layer, 1)


class _Call(NamedTuple):
    """One tapped layer call seen while tracing one example."""

    index: int  # position among all tap calls of the trace
    path: str  # the kernel's leaf path
    x_shape: tuple
    x_is_index: bool  # integer x: row indices of an embedding lookup
    y_shape: tuple
    transposed: bool  # y = x Wᵀ (an embedding's attend)


def _trace_calls(task, model, selection, selected, rest, state, example) -> list[_Call]:
    """Trace one example and list every tap call, in call order."""
    if getattr(model, "apply_tapped", None) is None:
        raise TypeError(
            f"projector='kronecker' needs a model that reports its layers, but "
            f"{model.name} has no apply_tapped. Use a flax.linen or flax.nnx model, or "
            "build trax_attr.Model(apply, split, name, apply_tapped=fn) where fn(params, "
            "state, tap, *inputs) calls y = tap(kernel_path, x, y) on each dense layer "
            "(the contract is in trax_attr.projection.kronecker's docstring).")
    calls = []

    def run(sel):
        def tap(path, x, y, transposed=False):
            calls.append(_Call(len(calls), path, tuple(x.shape),
                               bool(jnp.issubdtype(x.dtype, jnp.integer)), tuple(y.shape),
                               bool(transposed)))
            return y

        def apply_fn(s, *inputs):
            return model.apply_tapped(selection.merge(s, rest), state, tap, *inputs)

        return task.get_output(apply_fn, sel, *example)

    jax.eval_shape(run, selected)
    return calls


def _layer_dims(call: _Call, shape: tuple) -> tuple[int, int]:
    """(d_in, d_out) of the kernel leaf of ``shape`` as seen by one tap call; raises
    when the call does not fit the leaf."""
    size = int(np.prod(shape, dtype=np.int64))
    if call.transposed:
        d_out, d_in = call.x_shape[-1], call.y_shape[-1]
    else:
        d_out = call.y_shape[-1] if call.y_shape else 0
        d_in = size // d_out if call.x_is_index and d_out else (
            call.x_shape[-1] if call.x_shape else 0)
    if d_in * d_out != size or (call.x_is_index and call.transposed):
        raise ValueError(
            f"apply_tapped reported the layer of {call.path!r} (shape {shape}) with x of "
            f"shape {call.x_shape} and y of shape {call.y_shape}"
            + (" (transposed)" if call.transposed else "") + ", which does not fit: tap "
            "needs x (..., d_in) float or (...) integer row indices, y (..., d_out) with "
            "the kernel's entries d_in·d_out in (d_in, d_out) row-major order (transposed: "
            "x (..., d_out), y (..., d_in)). Reshape x and y to that form in the model's "
            "apply_tapped.")
    return d_in, d_out


def covered_layers(task, model, selection, selected, rest, state, example):
    """Trace one example -> (all tap calls, ``{kernel path: (d_in, d_out)}`` of the
    covered kernels). A selected kernel is covered when every use of it in the model
    goes through tapped calls; one also used elsewhere (its weights read directly, an
    untapped method) is left to the dense fallback, with a warning."""
    calls = _trace_calls(task, model, selection, selected, rest, state, example)
    leaf_shape = {p: np.shape(leaf) for p, leaf in zip(selection.paths, selected)}
    dims = {}
    for c in calls:
        if c.path not in leaf_shape:
            continue
        d = _layer_dims(c, leaf_shape[c.path])
        if dims.setdefault(c.path, d) != d:
            raise ValueError(f"apply_tapped reported the layer of {c.path!r} with dims "
                             f"{d} and {dims[c.path]} in two calls; they must agree.")
    for p in _used_untapped(task, model, selection, selected, rest, state, example,
                            sorted(dims, key=selection.paths.index)):
        warnings.warn(
            f"the kernel {p!r} is also used outside its tapped layer calls (read directly, "
            "or through a method apply_tapped does not report), so the kronecker projector "
            "cannot see its whole gradient; it takes the dense fallback projection.",
            stacklevel=3)
        del dims[p]
    return calls, dims


def _used_untapped(task, model, selection, selected, rest, state, example, paths):
    """The kernels among ``paths`` on which the output depends other than through their
    tapped outputs: with every tapped y behind stop_gradient, the ones whose tangent still
    reaches the output's JVP (a dependency walk over its jaxpr; conservative)."""
    if not paths:
        return []
    idx = [selection.paths.index(p) for p in paths]
    covered = set(paths)

    def jvp_out(kernels, tangents, selected, rest, state, example):
        def f(kernels):
            sel = list(selected)
            for j, i in enumerate(idx):
                sel[i] = kernels[j]

            def tap(path, x, y, transposed=False):
                return jax.lax.stop_gradient(y) if path in covered else y

            def apply_fn(s, *inputs):
                return model.apply_tapped(selection.merge(s, rest), state, tap, *inputs)

            return task.get_output(apply_fn, tuple(sel), *example)

        return jax.jvp(f, (kernels,), (tangents,))[1]

    from jax.extend.core import Literal  # here: jax.extend imports pallas too (0.1 s)

    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))  # noqa: E731
    kernels = tuple(spec(selected[i]) for i in idx)
    closed = jax.make_jaxpr(jvp_out)(kernels, kernels, *jax.tree.map(
        spec, (tuple(selected), tuple(rest), state, example)))
    jaxpr = closed.jaxpr
    n = len(idx)
    deps = {v: frozenset([j]) for j, v in enumerate(jaxpr.invars[n:2 * n])}
    for eqn in jaxpr.eqns:
        found = frozenset().union(*(deps.get(v, frozenset()) for v in eqn.invars
                                    if not isinstance(v, Literal)))
        if found:
            for v in eqn.outvars:
                deps[v] = found
    reached = frozenset().union(*(deps.get(v, frozenset()) for v in jaxpr.outvars
                                  if not isinstance(v, Literal)))
    return [paths[j] for j in sorted(reached)]


def structured_features(projector: KroneckerProjector, task, model, selection, selected,
                        rest, state, key, batch) -> jax.Array:
    """φ ``(B, k) f32`` of a batch; covered kernels' gradients are never formed."""
    example0 = jax.tree.map(lambda a: a[0], batch)
    calls, dims = covered_layers(task, model, selection, selected, rest, state, example0)
    layers = [c for c in calls if c.path in dims]
    kernel_paths = sorted(dims, key=selection.paths.index)
    fb_idx = [i for i, p in enumerate(selection.paths) if p not in dims]
    d = selection.grad_dim

    def one(example):
        def f(fb_leaves, perts):
            xs = []
            sel = list(selected)
            for j, i in enumerate(fb_idx):
                sel[i] = fb_leaves[j]

            def tap(path, x, y, transposed=False):
                i = len(xs)
                xs.append(x)
                return y + perts[i].astype(y.dtype)

            def apply_fn(s, *inputs):
                return model.apply_tapped(selection.merge(s, rest), state, tap, *inputs)

            return task.get_output(apply_fn, tuple(sel), *example), tuple(xs)

        # a zero perturbation on every tapped call: its cotangent is δ_t of that call
        perts = tuple(jnp.zeros(c.y_shape, jnp.float32) for c in calls)
        fb = tuple(selected[i] for i in fb_idx)
        (g_fb, g_perts), xs = jax.grad(f, argnums=(0, 1), has_aux=True)(fb, perts)
        return g_fb, g_perts, tuple(xs[c.index] for c in layers)

    g_fb, g_perts, xs = jax.vmap(one)(batch)
    dtype = jnp.dtype(projector.dtype)
    b = batch[0].shape[0]
    mats = {}
    for p in kernel_paths:
        k_in, k_out = layer_keys(key, p)
        d_in, d_out = dims[p]
        mats[p] = (projector.layer_projector(projector.r_in).matrix_block(k_in, 0, d_in),
                   projector.layer_projector(projector.r_out).matrix_block(k_out, 0, d_out))
    per_layer = {p: jnp.zeros((b, projector.r_in, projector.r_out), jnp.float32)
                 for p in kernel_paths}

    def small(a, p_mat):
        """(B, ..., d) -> (B, T, r): a projected on its last axis, positions flattened."""
        a = a.reshape(b, -1, a.shape[-1]).astype(dtype)
        return jnp.einsum("btd,dr->btr", a, p_mat.astype(dtype),
                          preferred_element_type=jnp.float32)

    for c, x in zip(layers, xs):
        p_in, p_out = mats[c.path]
        delta = g_perts[c.index]
        if c.transposed:  # y = x Wᵀ: δ meets the rows of W, x its columns
            a, z = small(delta, p_in), small(x, p_out)
        elif c.x_is_index:  # one-hot x: P_inᵀ x_t is the row P_in[x_t]
            a = jnp.take(p_in, x.reshape(b, -1), axis=0).astype(jnp.float32)
            z = small(delta, p_out)
        else:
            a, z = small(x, p_in), small(delta, p_out)
        per_layer[c.path] = per_layer[c.path] + jnp.einsum(
            "bti,btj->bij", a, z, precision=jax.lax.Precision.HIGHEST)
    parts = [per_layer[p].reshape(b, -1) for p in kernel_paths]
    if fb_idx:
        grads = tuple(g.reshape(b, -1) for g in g_fb)
        d_fb = sum(g.shape[1] for g in grads)
        # project() normalises by √d_fb; the block-diagonal P normalises by the total √d
        parts.append(projector.fallback.project(key, grads) * math.sqrt(d_fb))
    return jnp.concatenate(parts, axis=1) / jnp.float32(math.sqrt(d))
