"""Route 2: a torch module as a differentiable JAX function whose forward and VJP run torch.

:func:`torch_function` returns ``apply(params, state, *inputs)``, a JAX function of dicts
of arrays named as in ``module.state_dict()``. It runs the module in torch through
``jax.pure_callback``:

* forward: ``torch.func.functional_call`` of the module on the inputs;
* VJP (``jax.custom_vjp`` with symbolic zeros): ``torch.func.vjp`` of the same call with
  respect to the parameters (and float inputs) JAX differentiates, and only those, so a
  ``grad_wrt`` selection also saves torch the other parameters' gradients.

Any JAX task therefore differentiates through a torch model: the built-in ones (margins,
CLIP, causal LM) and the user's own, with ``jax.grad`` and ``jax.vmap`` as usual, and the
rest of the engine (projection, sharding, the store) is the one JAX models use.

Batching. Under ``jax.vmap`` the callbacks receive the whole batch at once
(``vmap_method="expand_dims"``): the mapped axes lead every mapped array, unmapped ones
(the parameters) get axes of size 1. TRAK's per-example gradients are
``vmap(grad(output))`` over examples whose output calls the model on a batch of one, so

* the forward merges the mapped axes into the model's batch axis: one torch call for the
  B examples (valid because in eval mode a model treats the examples of its batch
  independently; an output that is not per-example, such as CLIP's logit scale, is
  broadcast, and an output of any other shape falls back to one call per example);
* the VJP returns per-example parameter cotangents ``(B, *shape)``: ``torch.func.vmap``
  over ``torch.func.vjp``, as torch's per-sample-gradient recipe, or one example at a time
  where torch cannot vmap the forward (HuggingFace models check their attention masks
  with data-dependent Python control flow).

Arrays cross between JAX and torch through DLPack, without copies on CPU. Integer inputs
reach torch as int64 (what its embedding and indexing ops expect). Output shapes are
found once per input shape by running the module on zeros (or on fake tensors,
``torch._subclasses.FakeTensorMode``, where zeros fail).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

__all__ = ["torch_function"]

logger = logging.getLogger(__name__)


def _is_zero(ct) -> bool:
    return isinstance(ct, jax.custom_derivatives.SymbolicZero)


def _jax_dtype(dtype: torch.dtype) -> np.dtype:
    """The JAX dtype a torch output becomes (int64 -> int32 unless x64 is enabled)."""
    name = str(dtype).removeprefix("torch.")
    return jax.dtypes.canonicalize_dtype(jnp.dtype(name))


def _from_jax(array, device) -> torch.Tensor:
    tensor = torch.from_dlpack(array)
    if not tensor.is_floating_point() and tensor.dtype not in (torch.bool, torch.int64):
        tensor = tensor.long()
    return tensor.to(device)


def _to_jax(tensor: torch.Tensor, dtype) -> jax.Array:
    want = getattr(torch, np.dtype(dtype).name) if np.dtype(dtype).name != "bool" else torch.bool
    return jax.dlpack.from_dlpack(tensor.detach().to(want).contiguous())


def _vma(x) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``jax.shard_map`` (none outside)."""
    aval = jax.typeof(x)
    axes = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; earlier: aval.vma
    return frozenset(axes.varying) if axes is not None else getattr(aval, "vma", frozenset())


def _varying(cotangent, primal):
    """``cotangent`` varying over the manual mesh axes ``primal`` varies over: inside
    ``jax.shard_map`` a callback's results vary over none, but a VJP must return each
    cotangent with its primal's type."""
    if cotangent is None:
        return None
    missing = tuple(_vma(primal) - _vma(cotangent))
    return jax.lax.pcast(cotangent, missing, to="varying") if missing else cotangent


def _lead(arrays, ndims) -> tuple[int, ...]:
    """The mapped axes jax.vmap put in front of ``arrays`` (their unmapped ranks ``ndims``)."""
    leads = [tuple(a.shape[:a.ndim - nd]) for a, nd in zip(arrays, ndims)]
    return tuple(np.broadcast_shapes(*leads)) if leads else ()


class _Runner:
    """The module's calls in torch; a lock, since functional_call swaps its attributes."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        self.device = next(module.parameters(), torch.empty(0)).device
        self.lock = threading.Lock()
        self.vmappable = True  # until torch.func.vmap of the VJP fails once on this model

    def call(self, tensors: dict[str, torch.Tensor], inputs) -> list[torch.Tensor]:
        out = torch.func.functional_call(self.module, tensors, tuple(inputs))
        leaves = jax.tree_util.tree_leaves(out)
        if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            kinds = sorted({type(leaf).__name__ for leaf in leaves})
            raise TypeError(f"{self.name} returned {kinds}; a model must return tensors, or "
                            "tuples, lists or dicts of tensors.")
        return leaves

    def tree(self, inputs_shape):
        """(treedef, [ShapeDtypeStruct]) of the outputs for inputs of these shapes.

        Found by running the module once on zeros (at the traced shapes, usually a batch
        of one: cheaper than fake tensors, measured 0.04 s against 0.4 s for resnet18);
        where zeros are not a valid input, on fake tensors."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        def run():
            inputs = [torch.zeros(s, dtype=_torch_input_dtype(d), device=self.device)
                      for s, d in inputs_shape]
            return jax.tree_util.tree_flatten(
                torch.func.functional_call(self.module, {}, tuple(inputs)))

        with self.lock:
            try:
                with torch.no_grad():
                    leaves, treedef = run()
            except Exception:  # noqa: BLE001 - zeros may be no valid input: fake tensors
                with FakeTensorMode(allow_non_fake_inputs=True):
                    leaves, treedef = run()
        return treedef, [jax.ShapeDtypeStruct(tuple(leaf.shape), _jax_dtype(leaf.dtype))
                         for leaf in leaves]


def _torch_input_dtype(dtype) -> torch.dtype:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return torch.bool
    if np.issubdtype(dtype, np.integer):
        return torch.int64
    return getattr(torch, dtype.name)


def _squeezed(arrays: dict, shapes: dict, device, name: str) -> dict[str, torch.Tensor]:
    """Parameters as torch tensors without the size-1 axes vmap put in front."""
    out = {}
    for key, array in arrays.items():
        shape = shapes[key]
        if array.ndim != len(shape) and math.prod(array.shape[:array.ndim - len(shape)]) != 1:
            raise NotImplementedError(
                f"{name}: parameter {key!r} is mapped by jax.vmap (shape {array.shape}); "
                "backend=\"torch\" maps over examples only. Map over the inputs instead.")
        out[key] = _from_jax(array, device).reshape(shape)
    return out


def _merge(x: torch.Tensor, lead: tuple, shape: tuple) -> torch.Tensor:
    """``(*lead', *shape)`` -> ``(prod(lead) * shape[0], *shape[1:])``."""
    return x.expand(*lead, *shape).reshape(-1, *shape[1:])


def _per_example(x: torch.Tensor, lead: tuple, shape: tuple) -> torch.Tensor:
    """``(*lead', *shape)`` -> ``(prod(lead), *shape)``."""
    return x.expand(*lead, *shape).reshape(-1, *shape)


def _forward(runner: _Runner, params, state, inputs, *, in_shapes, param_shapes, out_avals):
    """The callback of the forward: jax arrays in, jax arrays out (mapped axes first)."""
    lead = _lead(inputs, [len(s) for s in in_shapes])
    n = math.prod(lead)
    with runner.lock, torch.no_grad():
        tensors = _squeezed({**state, **params}, param_shapes, runner.device, runner.name)
        xs = [_from_jax(x, runner.device) for x in inputs]
        if not lead:
            outs = runner.call(tensors, xs)
            return [_to_jax(o, a.dtype) for o, a in zip(outs, out_avals)]
        if all(len(s) for s in in_shapes):
            outs = runner.call(tensors, [_merge(x, lead, s) for x, s in zip(xs, in_shapes)])
            split = _unmerge(outs, out_avals, lead, n)
            if split is not None:
                return [_to_jax(o, a.dtype) for o, a in zip(split, out_avals)]
        # outputs that mix examples, or inputs without a batch axis: one call per example
        rows = [_per_example(x, lead, s) for x, s in zip(xs, in_shapes)]
        per = [runner.call(tensors, [r[j] for r in rows]) for j in range(n)]
        return [_to_jax(torch.stack([p[i] for p in per]).reshape(*lead, *a.shape), a.dtype)
                for i, a in enumerate(out_avals)]


def _unmerge(outs, out_avals, lead, n):
    """Merged-batch outputs back to ``(*lead, *shape)``, or None if one is not per-example."""
    split = []
    for o, aval in zip(outs, out_avals):
        shape = tuple(aval.shape)
        if shape and tuple(o.shape) == (n * shape[0], *shape[1:]):
            split.append(o.reshape(*lead, *shape))
        elif tuple(o.shape) == shape:  # the same for every example (CLIP's logit scale)
            split.append(o.expand(*lead, *shape))
        else:
            return None
    return split


def _vjp(runner: _Runner, chosen, others, state, inputs, cts, *, in_shapes, chosen_inputs,
         ct_index, out_shapes, param_shapes):
    """The callback of the VJP: cotangents of the chosen parameters and float inputs."""
    ndims = [len(s) for s in in_shapes] + [len(out_shapes[i]) for i in ct_index]
    lead = _lead(list(inputs) + list(cts), ndims)
    n = math.prod(lead)
    with runner.lock:
        fixed = _squeezed({**state, **others}, {k: param_shapes[k] for k in {**state, **others}},
                          runner.device, runner.name)
        wrt = _squeezed(chosen, {k: param_shapes[k] for k in chosen}, runner.device, runner.name)
        xs = [_from_jax(x, runner.device) for x in inputs]
        ts = [_from_jax(c, runner.device) for c in cts]

        def pullback(wrt, xs, ts):
            def f(wrt, picked):
                full = list(xs)
                for i, x in zip(chosen_inputs, picked):
                    full[i] = x
                outs = runner.call({**fixed, **wrt}, full)
                return tuple(outs[i] for i in ct_index)

            _, back = torch.func.vjp(f, wrt, tuple(xs[i] for i in chosen_inputs))
            return back(tuple(ts))

        if not lead:
            grads, input_grads = pullback(wrt, xs, ts)
        else:
            xs = [_per_example(x, lead, s) for x, s in zip(xs, in_shapes)]
            ts = [_per_example(t, lead, out_shapes[i]) for t, i in zip(ts, ct_index)]
            grads = None
            if runner.vmappable:
                try:
                    grads, input_grads = torch.func.vmap(pullback, in_dims=(None, 0, 0))(
                        wrt, xs, ts)
                except RuntimeError as err:  # data-dependent control flow in the forward
                    runner.vmappable = False
                    logger.info("%s: torch.func.vmap of the VJP failed (%s); per-example "
                                "gradients are computed one example at a time.", runner.name,
                                str(err).splitlines()[0])
            if grads is None:
                rows = [pullback(wrt, [x[j] for x in xs], [t[j] for t in ts]) for j in range(n)]
                grads = {k: torch.stack([r[0][k] for r in rows]) for k in wrt}
                input_grads = tuple(torch.stack([r[1][i] for r in rows])
                                    for i in range(len(chosen_inputs)))
            grads = {k: g.reshape(*lead, *param_shapes[k]) for k, g in grads.items()}
            input_grads = tuple(g.reshape(*lead, *in_shapes[i])
                                for g, i in zip(input_grads, chosen_inputs))
        return ({k: _to_jax(g, chosen[k].dtype) for k, g in grads.items()},
                tuple(_to_jax(g, inputs[i].dtype) for g, i in zip(input_grads, chosen_inputs)))


def torch_function(module: nn.Module, *, name: str | None = None) -> Callable[..., Any]:
    """``module`` as ``apply(params, state, *inputs)``, differentiable by JAX, run in torch.

    Args:
      module: the torch module, in the mode it is to be evaluated in (eval). It is not
        changed; calls hold a lock, as ``functional_call`` swaps its tensors.
      name: what the model is, for messages.

    Returns:
      ``apply(params, state, *inputs) -> outputs``: ``params`` and ``state`` are dicts of
      arrays by name (``state`` may be None); inputs have a batch axis; outputs are the
      module's tensors (a tensor, or tuples, lists, dicts of them) as jax arrays.
    """
    runner = _Runner(module, name or type(module).__name__)
    trees: dict = {}  # output structure per input signature, found once each

    def outputs_of(inputs):
        signature = tuple((tuple(x.shape), np.dtype(x.dtype).str) for x in inputs)
        if signature not in trees:
            trees[signature] = runner.tree([(s, d) for s, d in signature])
        return trees[signature]

    def forward(params, state, inputs):
        treedef, avals = outputs_of(inputs)
        shapes = {"in_shapes": [tuple(x.shape) for x in inputs], "out_avals": avals,
                  "param_shapes": {k: tuple(v.shape) for k, v in {**state, **params}.items()}}
        flat = jax.pure_callback(
            lambda p, s, x: _forward(runner, p, s, x, **shapes), avals,
            params, state, inputs, vmap_method="expand_dims")
        return jax.tree_util.tree_unflatten(treedef, flat)

    @jax.custom_vjp
    def call(params, state, inputs):
        return forward(params, state, inputs)

    def call_fwd(params, state, inputs):
        values = jax.tree.map(lambda primal: primal.value, (params, state, inputs))
        # which arguments JAX differentiates, as dict keys: residuals hold arrays and structure
        chosen = {k: None for k, primal in params.items() if primal.perturbed}
        chosen_inputs = {i: None for i, primal in enumerate(inputs) if primal.perturbed}
        return forward(*values), (values, chosen, chosen_inputs)

    def call_bwd(residuals, cotangent):
        (params, state, inputs), chosen, chosen_inputs = residuals
        flat = jax.tree_util.tree_leaves(cotangent, is_leaf=_is_zero)
        ct_index = [i for i, c in enumerate(flat) if not _is_zero(c)]
        wanted = {k: params[k] for k in chosen}
        picked = tuple(sorted(chosen_inputs))
        if not ct_index or not (wanted or picked):
            return ({k: None for k in params}, None, tuple(None for _ in inputs))
        _, avals = outputs_of(inputs)
        result = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in wanted.items()},
                  tuple(jax.ShapeDtypeStruct(inputs[i].shape, inputs[i].dtype) for i in picked))
        others = {k: v for k, v in params.items() if k not in wanted}
        param_shapes = {k: tuple(v.shape) for k, v in {**state, **params}.items()}

        def back(chosen_arrays, other_arrays, state_arrays, input_arrays, cts):
            return _vjp(runner, chosen_arrays, other_arrays, state_arrays, input_arrays, cts,
                        in_shapes=[tuple(x.shape) for x in inputs], chosen_inputs=picked,
                        ct_index=ct_index, out_shapes=[tuple(a.shape) for a in avals],
                        param_shapes=param_shapes)

        grads, input_grads = jax.pure_callback(
            back, result, wanted, others, state, inputs, [flat[i] for i in ct_index],
            vmap_method="expand_dims")
        by_input = dict(zip(picked, input_grads))

        return ({k: _varying(grads.get(k), v) for k, v in params.items()}, None,
                tuple(_varying(by_input.get(i), x) for i, x in enumerate(inputs)))

    call.defvjp(call_fwd, call_bwd, symbolic_zeros=True)

    def apply(params, state, *inputs):
        return call(dict(params), dict(state or {}), tuple(jnp.asarray(x) for x in inputs))

    return apply
