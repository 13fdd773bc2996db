"""Elementwise ATen ops: arithmetic, comparisons, logic, activations, rounding.

Dtypes are torch's: the interpreter casts every result to the dtype torch's own graph
recorded for that node, so JAX's promotion rules never leak into the converted function.
Gradients follow torch's where the two differ at kinks (``clamp`` passes the gradient at
its bounds, as torch does; ``jnp.clip`` would halve it).
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from .base import op

_UNARY = {
    "abs": jnp.abs, "neg": jnp.negative, "exp": jnp.exp, "exp2": jnp.exp2,
    "expm1": jnp.expm1, "log": jnp.log, "log1p": jnp.log1p, "log2": jnp.log2,
    "log10": jnp.log10, "sqrt": jnp.sqrt, "rsqrt": jax.lax.rsqrt, "reciprocal": jnp.reciprocal,
    "sin": jnp.sin, "cos": jnp.cos, "tan": jnp.tan, "asin": jnp.arcsin, "acos": jnp.arccos,
    "atan": jnp.arctan, "sinh": jnp.sinh, "cosh": jnp.cosh, "tanh": jnp.tanh,
    "asinh": jnp.arcsinh, "acosh": jnp.arccosh, "atanh": jnp.arctanh,
    "erf": jax.scipy.special.erf, "erfinv": jax.scipy.special.erfinv,
    "sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "silu": jax.nn.silu,
    "sign": jnp.sign, "floor": jnp.floor, "ceil": jnp.ceil, "trunc": jnp.trunc,
    "round": jnp.round, "isnan": jnp.isnan, "isinf": jnp.isinf, "isfinite": jnp.isfinite,
    "logical_not": jnp.logical_not, "bitwise_not": jnp.invert,
}
for _name, _fn in _UNARY.items():
    op(f"{_name}.default")(lambda self, _fn=_fn: _fn(self))

_BINARY = {  # overloads .Tensor and .Scalar
    "mul": jnp.multiply, "remainder": jnp.remainder, "fmod": jnp.fmod,
    "eq": jnp.equal, "ne": jnp.not_equal, "lt": jnp.less, "le": jnp.less_equal,
    "gt": jnp.greater, "ge": jnp.greater_equal, "bitwise_and": jnp.bitwise_and,
    "bitwise_or": jnp.bitwise_or, "bitwise_xor": jnp.bitwise_xor,
}
for _name, _fn in _BINARY.items():
    op(f"{_name}.Tensor", f"{_name}.Scalar")(lambda self, other, _fn=_fn: _fn(self, other))

_BINARY_TENSORS = {  # overload .default
    "maximum": jnp.maximum, "minimum": jnp.minimum, "atan2": jnp.arctan2,
    "logical_and": jnp.logical_and, "logical_or": jnp.logical_or,
    "logical_xor": jnp.logical_xor,
}
for _name, _fn in _BINARY_TENSORS.items():
    op(f"{_name}.default")(lambda self, other, _fn=_fn: _fn(self, other))


@op("add.Tensor", "add.Scalar")
def add(self, other, alpha=1):
    return self + (other if alpha == 1 else alpha * other)


@op("sub.Tensor", "sub.Scalar")
def sub(self, other, alpha=1):
    return self - (other if alpha == 1 else alpha * other)


@op("rsub.Tensor", "rsub.Scalar")
def rsub(self, other, alpha=1):
    return other - (self if alpha == 1 else alpha * self)


def _integer(x) -> bool:
    return isinstance(x, int) or (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.integer))


@op("div.Tensor", "div.Scalar", "div.Tensor_mode", "div.Scalar_mode")
def div(self, other, *, rounding_mode=None):
    if rounding_mode is None:
        return jnp.true_divide(self, other)
    if rounding_mode == "floor":
        return jnp.floor_divide(self, other)
    if _integer(self) and _integer(other):  # C division, exact on integers
        return jnp.sign(self) * jnp.sign(other) * (jnp.abs(self) // jnp.abs(other))
    return jnp.trunc(jnp.true_divide(self, other))


@op("pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar")
def pow_(self, exponent):
    return jnp.power(self, exponent)


@op("where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar")
def where(condition, self, other):
    return jnp.where(condition, self, other)


@op("clamp.default", "clamp.Tensor")
def clamp(self, min=None, max=None):  # noqa: A002 - ATen's names
    # where, not jnp.clip: torch passes the gradient at the bounds, and NaN through
    if min is not None:
        self = jnp.where(self < min, jnp.asarray(min, self.dtype), self)
    if max is not None:
        self = jnp.where(self > max, jnp.asarray(max, self.dtype), self)
    return self


@op("clamp_min.default", "clamp_min.Tensor")
def clamp_min(self, min):  # noqa: A002
    return clamp(self, min, None)


@op("clamp_max.default", "clamp_max.Tensor")
def clamp_max(self, max):  # noqa: A002
    return clamp(self, None, max)


@op("hardtanh.default")
def hardtanh(self, min_val=-1, max_val=1):
    # unlike clamp, torch's hardtanh (ReLU6) has zero gradient at the bounds
    inside = (self > min_val) & (self < max_val)
    edge = jnp.where(self <= min_val, jnp.asarray(min_val, self.dtype),
                     jnp.asarray(max_val, self.dtype))
    return jnp.where(inside | jnp.isnan(self), self, edge)


@op("leaky_relu.default")
def leaky_relu(self, negative_slope=0.01):
    return jnp.where(self > 0, self, self * negative_slope)


@op("elu.default")
def elu(self, alpha=1, scale=1, input_scale=1):
    return scale * jnp.where(self > 0, self, alpha * jnp.expm1(self * input_scale))


@op("gelu.default")
def gelu(self, *, approximate="none"):
    return jax.nn.gelu(self, approximate=approximate == "tanh")


@op("softplus.default")
def softplus(self, beta=1, threshold=20):
    scaled = self * beta
    return jnp.where(scaled > threshold, self,
                     jnp.log1p(jnp.exp(jnp.minimum(scaled, threshold))) / beta)


@op("hardsigmoid.default")
def hardsigmoid(self):
    return jnp.where(self <= -3, 0.0, jnp.where(self >= 3, 1.0, self / 6 + 0.5))


@op("hardswish.default")
def hardswish(self):
    return self * hardsigmoid(self)


@op("round.decimals")
def round_decimals(self, *, decimals=0):
    return jnp.round(self, decimals)


@op("nan_to_num.default")
def nan_to_num(self, nan=None, posinf=None, neginf=None):
    return jnp.nan_to_num(self, nan=0.0 if nan is None else nan, posinf=posinf, neginf=neginf)


@op("logit.default")
def logit(self, eps=None):
    if eps is not None:
        self = clamp(self, eps, 1 - eps)
    return jnp.log(self / (1 - self))


# Python arithmetic on sizes (SymInt nodes of the graph): plain numbers at run time.
for _fn in (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
            operator.mod, operator.pow, operator.neg, operator.eq, operator.ne, operator.lt,
            operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
            operator.getitem):
    op(f"operator.{_fn.__name__}")(_fn)
