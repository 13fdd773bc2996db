"""Weight transfer between a torch model and its Flax twin (nnx or linen), both directions.

Twins share their layer names: the torch submodule ``features.0`` is the Flax path
``features/0`` (nnx attribute names, or ``name=`` of linen submodules), unless ``names``
maps a torch module name to another Flax path. Per layer:

=================  ===============================  ===================================
torch              Flax                             transform
=================  ===============================  ===================================
Linear.weight      Linear/Dense kernel              (out, in) -> (in, out)
ConvNd.weight      Conv kernel                      (O, I, *K) -> (*K, I, O)
BatchNorm weight,  scale, bias, mean, var           none (linen: stats in batch_stats)
bias, running_*
LayerNorm          scale, bias                      none
Embedding.weight   embedding                        none
=================  ===============================  ===================================

Inputs differ too: torch convolutions take NCHW, Flax NHWC (``x.transpose(0, 2, 3, 1)``),
and a Flatten after a convolution orders features differently in the two; the twin must
account for that itself (a global pooling before the head avoids it). Epsilons differ by
default (nnx/linen LayerNorm 1e-6, torch 1e-5): give the twin torch's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from trax_attr.gradients import leaf_path

__all__ = ["torch_to_flax", "flax_to_torch", "Pair", "layer_pairs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LAYERS = {  # torch tensor name -> (flax leaf name, is a statistic)
    "linear": {"weight": ("kernel", False), "bias": ("bias", False)},
    "conv": {"weight": ("kernel", False), "bias": ("bias", False)},
    "batch_norm": {"weight": ("scale", False), "bias": ("bias", False),
                   "running_mean": ("mean", True), "running_var": ("var", True)},
    "layer_norm": {"weight": ("scale", False), "bias": ("bias", False)},
    "embedding": {"weight": ("embedding", False)},
}


class Pair(NamedTuple):
    """One tensor in both frameworks: its torch name, Flax path and layout change."""

    torch_name: str
    flax_path: str
    kind: str  # "linear", "conv" or "same"
    statistic: bool


def _layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONVS):
        return "conv"
    if isinstance(module, _NORMS):
        return "batch_norm"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def layer_pairs(module: nn.Module, names: Mapping[str, str] | None = None) -> list[Pair]:
    """The tensors of ``module`` paired with Flax paths (without a linen collection).

    Raises:
      ValueError: a module holding tensors of a type with no known Flax twin.
    """
    names = dict(names or {})
    pairs = []
    for mod_name, sub in module.named_modules():
        own = [n for n, _ in sub.named_parameters(recurse=False)] + \
              [n for n, _ in sub.named_buffers(recurse=False)]
        if not own:
            continue
        kind = _layer_kind(sub)
        if kind is None:
            raise ValueError(
                f"torch module {mod_name!r} ({type(sub).__name__}) holds tensors {own}, but "
                "only Linear, Conv1d/2d/3d, BatchNorm, LayerNorm and Embedding have a known "
                "Flax twin; transfer this layer's weights by hand."
            )
        prefix = names.get(mod_name, mod_name.replace(".", "/"))
        for tensor_name in own:
            if tensor_name == "num_batches_tracked":
                continue  # Flax keeps no such counter
            leaf, statistic = _LAYERS[kind][tensor_name]
            layout = kind if tensor_name == "weight" and kind in ("linear", "conv") else "same"
            torch_name = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
            pairs.append(Pair(torch_name, f"{prefix}/{leaf}" if prefix else leaf, layout,
                              statistic))
    return pairs


def _to_flax_layout(x, layout: str):
    """A torch weight in the Flax layout: Linear (out, in) -> (in, out); Conv
    (out, in, *window) -> (*window, in, out); anything else unchanged."""
    return {"linear": lambda: x.T,
            "conv": lambda: x.transpose(tuple(range(2, x.ndim)) + (1, 0))}.get(
        layout, lambda: x)()


def _to_torch_layout(x, layout: str):
    """The inverse of :func:`_to_flax_layout`."""
    n = x.ndim
    return {"linear": lambda: x.T,
            "conv": lambda: x.transpose((n - 1, n - 2) + tuple(range(n - 2)))}.get(
        layout, lambda: x)()


def _flat(tree) -> dict[str, Any]:
    return {leaf_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flax_tree(target):
    """(tree of arrays, rebuild(new tree) -> target's type, is_linen)."""
    from flax import nnx

    if isinstance(target, nnx.Module):
        graphdef, state = nnx.split(target)
        return state, lambda new: nnx.merge(graphdef, new), False
    if isinstance(target, nnx.State):
        return target, lambda new: new, False
    if isinstance(target, Mapping) and "params" in target:
        return target, lambda new: new, True
    raise TypeError(
        f"the Flax side must be an nnx.Module, an nnx.State or a linen variables dict "
        f"{{'params': ..., 'batch_stats': ...}}; got {type(target).__name__}."
    )


def _flax_path(pair: Pair, linen: bool) -> str:
    if not linen:
        return pair.flax_path
    return ("batch_stats/" if pair.statistic else "params/") + pair.flax_path


def _as_array(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _check_paths(pairs, flat: Mapping, linen: bool, strict: bool, what: str) -> list[Pair]:
    present = [p for p in pairs if _flax_path(p, linen) in flat]
    if strict:
        missing = [_flax_path(p, linen) for p in pairs if _flax_path(p, linen) not in flat]
        covered = {_flax_path(p, linen) for p in pairs}
        extra = [path for path, leaf in flat.items() if path not in covered
                 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
        if missing or extra:
            raise ValueError(
                f"the Flax {what} does not mirror the torch model: Flax paths missing "
                f"{missing[:8]}, Flax leaves without a torch tensor {extra[:8]} (Flax has "
                f"{sorted(flat)[:12]}). Give the twins the same layer names, or map torch "
                "module names to Flax paths with names={'torch.name': 'flax/path'}."
            )
    return present


def torch_to_flax(source, target, *, module: nn.Module | None = None,
                  names: Mapping[str, str] | None = None, strict: bool = True):
    """Copy torch weights into the layout of a Flax twin; returns a new Flax object.

    Args:
      source: a torch module, or a mapping ``{state_dict name: tensor or array}`` (then
        ``module`` gives the architecture). jax arrays pass through untouched, so the
        transfer can run inside ``jit`` or ``grad`` (e.g. to view a Flax twin in torch's
        parameter layout).
      target: an nnx Module (a new module is returned; the target is not changed), an
        nnx.State (a new State), or a linen variables dict (a new dict).
      module: the torch architecture when ``source`` is a mapping.
      names: torch module name -> Flax path, for layers whose names differ.
      strict: require every torch tensor to have a Flax leaf and vice versa; with False,
        only the leaves present on both sides are transferred (e.g. a params-only State).

    Raises:
      ValueError: names or shapes that do not match, naming them.
    """
    if module is None:
        if not isinstance(source, nn.Module):
            raise TypeError("source is a mapping of tensors: pass the torch architecture "
                            "as module=.")
        module = source
    arrays = source.state_dict() if isinstance(source, nn.Module) else source
    tree, rebuild, linen = _flax_tree(target)
    flat = _flat(tree)
    pairs = _check_paths(layer_pairs(module, names), flat, linen, strict, "target")
    new = {}
    for pair in pairs:
        if pair.torch_name not in arrays:
            if strict:
                raise ValueError(f"source has no tensor {pair.torch_name!r}; it has "
                                 f"{sorted(arrays)[:12]}.")
            continue
        path = _flax_path(pair, linen)
        value = _to_flax_layout(_as_array(arrays[pair.torch_name]), pair.kind)
        if tuple(value.shape) != tuple(np.shape(flat[path])):
            raise ValueError(
                f"torch {pair.torch_name} {tuple(np.shape(arrays[pair.torch_name]))} becomes "
                f"{tuple(value.shape)} in Flax layout, but Flax {path} is "
                f"{tuple(np.shape(flat[path]))}; the twins' layer sizes differ."
            )
        new[path] = value
    out = jax.tree_util.tree_map_with_path(
        lambda p, leaf: new.get(leaf_path(p), leaf), tree)
    return rebuild(out)


def flax_to_torch(source, module: nn.Module, *, names: Mapping[str, str] | None = None,
                  strict: bool = True, as_numpy: bool = False,
                  batched: bool = False) -> dict[str, Any]:
    """A torch state_dict for ``module`` from a Flax twin's weights.

    Args:
      source: an nnx Module, nnx.State or linen variables dict (or a pytree of the same
        structure, e.g. gradients: they change layout exactly as the weights do).
      module: the torch architecture; tensors Flax does not hold (``num_batches_tracked``)
        are taken from it.
      names, strict: as in :func:`torch_to_flax`.
      as_numpy: return numpy arrays instead of torch tensors.
      batched: the leaves carry a leading batch axis (per-example gradients), kept as is.

    Returns:
      ``{name: tensor}`` to pass to ``module.load_state_dict``.
    """
    tree, _, linen = _flax_tree(source)
    flat = _flat(tree)
    pairs = _check_paths(layer_pairs(module, names), flat, linen, strict, "source")
    expected = module.state_dict()
    out: dict[str, Any] = {} if strict is False else {
        k: v.detach().clone() for k, v in expected.items() if k.endswith("num_batches_tracked")}
    for pair in pairs:
        leaf = np.asarray(flat[_flax_path(pair, linen)])
        if batched:
            value = np.stack([_to_torch_layout(one, pair.kind) for one in leaf])
        else:
            value = np.asarray(_to_torch_layout(leaf, pair.kind))
        want = ((len(leaf),) if batched else ()) + tuple(expected[pair.torch_name].shape)
        if value.shape != want:
            raise ValueError(
                f"Flax {_flax_path(pair, linen)} becomes {value.shape} in torch layout, but "
                f"torch {pair.torch_name} is {want}; the twins' layer sizes differ."
            )
        out[pair.torch_name] = value if as_numpy else torch.from_numpy(np.array(value))
    if as_numpy:
        out = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
               for k, v in out.items()}
    return out
