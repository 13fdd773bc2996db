"""The converted route's op table: core ATen ops (and a few kept whole) as jnp functions.

``OPS["aten.add.Tensor"](self, other, alpha=1)`` computes what torch's op computes, on jax
arrays, with the arguments of the op's ATen schema. ``SUPPORTED_OPS`` lists the names;
``MISSING_REASONS`` says, for ops deliberately left out, what in a model produces them.
Each op is checked against torch in tests/interop/test_aten_ops.py.
"""

from . import elementwise, nn, reductions, tensors  # noqa: F401 - they fill OPS
from .base import OPS, UnsupportedOpError, op_name, unsupported

SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(OPS))

# What a model does to produce an op that is not converted, so the error can say it.
MISSING_REASONS = {
    "aten.nonzero.default": "torch.nonzero, torch.where(condition) with one argument or "
                            "x[mask]: its output size depends on the data",
    "aten._local_scalar_dense.default": "Tensor.item(), float(t) or int(t): a tensor's value "
                                        "read as a Python number",
    "aten.item.default": "Tensor.item(): a tensor's value read as a Python number",
    "aten.rand.default": "random numbers in forward",
    "aten.randn.default": "random numbers in forward",
    "aten.bernoulli.p": "random numbers in forward",
    "aten.randperm.default": "random numbers in forward",
    "aten.as_strided.default": "Tensor.as_strided: views of arbitrary strides",
    "aten.masked_scatter.default": "Tensor.masked_scatter: its layout depends on the data",
}

__all__ = ["OPS", "SUPPORTED_OPS", "MISSING_REASONS", "UnsupportedOpError", "op_name",
           "unsupported"]
