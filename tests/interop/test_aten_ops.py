"""The converted route's op table, op by op, against torch's own ATen ops.

Each case calls ``torch.ops.aten.<op>`` and the table's jnp body on the same arguments
(cast as the interpreter casts: to the dtype torch's result has) and compares the values;
cases marked ``grad`` also compare the vector-Jacobian product with a random cotangent
(torch.autograd vs jax.vjp). A last test checks that every op of the table has a case.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need torch (the interop extra)")

from trax_attr.interop import aten  # noqa: E402
from trax_attr.interop.aten.base import to_numpy  # noqa: E402

import trax_attr.interop  # noqa: E402,F401

from trax_attr.interop.interpret import like_torch  # noqa: E402

g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


def rand(*shape, low=0.0, high=1.0):
    return low + (high - low) * torch.rand(*shape, generator=g)


def ints(*shape, high=5):
    return torch.randint(0, high, shape, generator=g)


def bools(*shape):
    return torch.rand(*shape, generator=g) > 0.5


X = (3, 4)
CASES = []  # (id, op name, args, kwargs, grad)


def case(name, *args, grad=False, id=None, **kwargs):  # noqa: A002
    CASES.append((id or name, name, args, kwargs, grad))


# --- elementwise ------------------------------------------------------------------------------
DOMAIN = {"log": (0.1, 3), "log1p": (0.1, 3), "log2": (0.1, 3), "log10": (0.1, 3),
          "sqrt": (0.1, 3), "rsqrt": (0.1, 3), "reciprocal": (0.5, 3), "asin": (-0.9, 0.9),
          "acos": (-0.9, 0.9), "atanh": (-0.9, 0.9), "erfinv": (-0.9, 0.9), "acosh": (1.1, 3),
          "tan": (-1, 1)}
for name in ["abs", "neg", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt",
             "rsqrt", "reciprocal", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh",
             "tanh", "asinh", "acosh", "atanh", "erf", "erfinv", "sigmoid", "relu", "silu",
             "sign", "floor", "ceil", "trunc", "round"]:
    low, high = DOMAIN.get(name, (-2, 2))
    case(f"aten.{name}.default", rand(*X, low=low, high=high), grad=True)
with_nan = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
for name in ["isnan", "isinf", "isfinite"]:
    case(f"aten.{name}.default", with_nan)
case("aten.nan_to_num.default", with_nan, 0.5, 10.0, -10.0)
case("aten.nan_to_num.default", with_nan, id="nan_to_num_defaults")
case("aten.logical_not.default", bools(*X))
case("aten.bitwise_not.default", bools(*X))
case("aten.bitwise_not.default", ints(*X), id="bitwise_not_int")
for name in ["mul", "remainder", "fmod", "eq", "ne", "lt", "le", "gt", "ge"]:
    case(f"aten.{name}.Tensor", randn(*X), rand(4, low=0.5, high=2), grad=name == "mul")
    case(f"aten.{name}.Scalar", randn(*X), 0.7)
for name in ["bitwise_and", "bitwise_or", "bitwise_xor"]:
    case(f"aten.{name}.Tensor", bools(*X), bools(*X))
    case(f"aten.{name}.Scalar", ints(*X, high=8), 5)
for name in ["maximum", "minimum", "atan2"]:
    case(f"aten.{name}.default", randn(*X), randn(*X), grad=True)
for name in ["logical_and", "logical_or", "logical_xor"]:
    case(f"aten.{name}.default", bools(*X), randn(*X))
case("aten.add.Tensor", randn(*X), randn(4), alpha=2.5, grad=True)
case("aten.add.Scalar", ints(*X), 3, id="add_int_scalar")
case("aten.sub.Tensor", randn(*X), randn(*X), grad=True)
case("aten.sub.Scalar", randn(*X), 1.5, 2)
case("aten.rsub.Tensor", randn(*X), randn(*X), alpha=3, grad=True)
case("aten.rsub.Scalar", randn(*X), 1.0)
case("aten.div.Tensor", randn(*X), rand(*X, low=0.5, high=2), grad=True)
case("aten.div.Tensor", ints(*X), torch.full(X, 2), id="div_true_ints")
case("aten.div.Scalar", randn(*X), 3.0)
case("aten.div.Tensor_mode", randn(*X) * 4, rand(*X, low=0.5, high=2), rounding_mode="floor")
case("aten.div.Tensor_mode", randn(*X) * 4, rand(*X, low=0.5, high=2), rounding_mode="trunc",
     id="div_trunc")
case("aten.div.Tensor_mode", ints(*X, high=9) - 4, torch.full(X, 3), rounding_mode="trunc",
     id="div_trunc_ints")
case("aten.div.Scalar_mode", randn(*X) * 4, 1.5, rounding_mode="floor")
case("aten.pow.Tensor_Scalar", randn(*X), 2, grad=True)
case("aten.pow.Tensor_Scalar", rand(*X, low=0.1, high=2), 0.5, grad=True, id="pow_sqrt")
case("aten.pow.Tensor_Tensor", rand(*X, low=0.1, high=2), randn(*X), grad=True)
case("aten.pow.Scalar", 2.0, randn(*X), grad=True)
case("aten.where.self", bools(*X), randn(*X), randn(4), grad=True)
case("aten.where.ScalarSelf", bools(*X), 0.5, randn(*X))
case("aten.where.ScalarOther", bools(*X), randn(*X), -1.0)
case("aten.where.Scalar", bools(*X), 1.0, 0.0)
bounded = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])  # the bounds are hit exactly
case("aten.clamp.default", bounded, -1.0, 1.0, grad=True)
case("aten.clamp.Tensor", bounded, torch.full((7,), -0.5), None, grad=True)
case("aten.clamp_min.default", bounded, -1.0, grad=True)
case("aten.clamp_min.Tensor", bounded, torch.zeros(7), grad=True)
case("aten.clamp_max.default", bounded, 1.0, grad=True)
case("aten.clamp_max.Tensor", bounded, torch.zeros(7), grad=True)
case("aten.hardtanh.default", bounded * 2, -2.0, 2.0, grad=True)
case("aten.leaky_relu.default", randn(*X), 0.2, grad=True)
case("aten.elu.default", randn(*X), 1.5, 1.1, 0.9, grad=True)
case("aten.gelu.default", randn(*X), grad=True)
case("aten.gelu.default", randn(*X), approximate="tanh", grad=True, id="gelu_tanh")
case("aten.softplus.default", randn(*X) * 10, 2.0, 5.0, grad=True)
case("aten.hardsigmoid.default", randn(*X) * 4, grad=True)
case("aten.hardswish.default", randn(*X) * 4, grad=True)
case("aten.round.decimals", randn(*X), decimals=2)
case("aten.logit.default", rand(*X, low=0.05, high=0.95), grad=True)
case("aten.logit.default", rand(*X), 0.1, id="logit_eps")

# --- factories, casts, no-ops -----------------------------------------------------------------
case("aten._assert_tensor_metadata.default", randn(*X), dtype=torch.float32)
case("aten._assert_scalar.default", True, "never raised")
case("aten._assert_async.msg", torch.tensor(True), "never raised")
case("aten.sym_constrain_range_for_size.default", 3)
for name in ["clone", "alias", "lift_fresh_copy", "contiguous"]:
    case(f"aten.{name}.default", randn(*X), grad=name == "clone")
case("aten.detach.default", randn(*X))
case("aten._to_copy.default", randn(*X), dtype=torch.float16)
case("aten._to_copy.default", randn(*X) * 3, dtype=torch.int64, id="to_copy_int")
case("aten._to_copy.default", randn(*X), id="to_copy_same")
case("aten.copy.default", randn(*X), randn(4))  # torch has no derivative of aten::copy
case("aten.fill.Scalar", randn(*X), 2.5)
case("aten.fill.Tensor", randn(*X), torch.tensor(1.5))
case("aten.full.default", [2, 3], 1.5)
case("aten.full.default", [2, 3], 7, dtype=torch.int64, id="full_int")
case("aten.full_like.default", randn(*X), 3)
case("aten.full_like.default", randn(*X), True, dtype=torch.bool, id="full_like_bool")
case("aten.empty.memory_format", [2, 3], dtype=torch.float32)
case("aten.zeros.default", [2, 3])
case("aten.empty_strided.default", [2, 3], [3, 1])
case("aten.empty_like.default", randn(*X))
case("aten.zeros_like.default", randn(*X), dtype=torch.int32)
case("aten.ones_like.default", randn(*X))
case("aten.scalar_tensor.default", -1e9)
case("aten.scalar_tensor.default", 3, dtype=torch.int64, id="scalar_tensor_int")
case("aten.arange.start_step", 1, 10, 3)
case("aten.arange.start_step", 0.0, 2.0, 0.25, dtype=torch.float32, id="arange_float")
case("aten.arange.start", 2, 7)
case("aten.arange.default", 5)
case("aten.sym_size.int", randn(*X), 1)
case("aten.sym_numel.default", randn(*X))
case("aten.sym_stride.int", randn(2, 3, 4), 0)

# --- shapes -------------------------------------------------------------------------------
case("aten.view.default", randn(2, 6), [3, -1], grad=True)
case("aten._unsafe_view.default", randn(2, 6), [4, 3])
case("aten.reshape.default", randn(2, 6), [12])
case("aten.permute.default", randn(2, 3, 4), [2, 0, 1], grad=True)
case("aten.transpose.int", randn(2, 3, 4), 0, -1)
case("aten.t.default", randn(2, 3))
case("aten.expand.default", randn(3, 1), [2, -1, 4], grad=True)
case("aten.squeeze.dims", randn(1, 3, 1, 2), [0, 2, 3])
case("aten.squeeze.dim", randn(1, 3), 0)
case("aten.squeeze.default", randn(1, 3, 1))
case("aten.unsqueeze.default", randn(2, 3), -1)
case("aten.slice.Tensor", randn(4, 6), 1, 1, 9223372036854775807, 2, grad=True)
case("aten.slice.Tensor", randn(4, 6), 0, -3, None, id="slice_negative")
case("aten.select.int", randn(4, 6), 1, -2, grad=True)
case("aten.slice_scatter.default", randn(4, 6), randn(4, 2), 1, 2, 6, 2, grad=True)
case("aten.select_scatter.default", randn(4, 6), randn(6), 0, 1, grad=True)
case("aten.diagonal.default", randn(3, 4, 5), 1, 1, 2)
case("aten.cat.default", [randn(2, 3), randn(1, 3), torch.zeros(0)])  # grad: below
case("aten.split_with_sizes.default", randn(5, 2), [2, 3], grad=True)
case("aten.split.Tensor", randn(5, 2), 2)
case("aten.unbind.int", randn(3, 2), 1)
case("aten.flip.default", randn(3, 4), [0, 1])
case("aten.roll.default", randn(3, 4), [1, -1], [0, 1])
case("aten.roll.default", randn(3, 4), [5], id="roll_flat")
case("aten.repeat.default", randn(2, 3), [2, 1, 2], grad=True)
case("aten.constant_pad_nd.default", randn(2, 3, 4), [1, 2, -1, 1], 0.5, grad=True)
case("aten.reflection_pad1d.default", randn(2, 3, 5), [2, 1])
case("aten.reflection_pad2d.default", randn(2, 3, 5), [1, 2, 2, 1], grad=True)
case("aten.reflection_pad3d.default", randn(1, 3, 4, 5), [1, 1, 2, 0, 1, 2])
case("aten.replication_pad1d.default", randn(2, 3, 5), [2, 1])
case("aten.replication_pad2d.default", randn(2, 3, 5), [1, 2, 2, 1], grad=True)
case("aten.replication_pad3d.default", randn(1, 3, 4, 5), [1, 1, 2, 0, 1, 2])

# --- indexing -------------------------------------------------------------------------------
index = torch.tensor([[0, 2], [3, -1]])
case("aten.index.Tensor", randn(4, 5, 6), [None, index, torch.tensor([1, 0])], grad=True)
case("aten.index.Tensor", randn(4, 5, 6), [index, None, torch.tensor([1, 0])], grad=True,
     id="index_separated")
case("aten._unsafe_index.Tensor", randn(4, 5), [torch.tensor([3, 0, 0])])
case("aten.index_put.default", randn(4, 5), [torch.tensor([1, 1, 3])], randn(3, 5), True,
     grad=True)
case("aten.index_put.default", randn(4, 5), [None, torch.tensor([0, 2])], torch.tensor(9.0),
     id="index_put_set")
case("aten._unsafe_index_put.default", randn(4, 5), [torch.tensor([2])], randn(5))
case("aten.index_select.default", randn(4, 5), 1, torch.tensor([4, 0, 0]), grad=True)
case("aten.gather.default", randn(4, 5), 1, torch.tensor([[0, 4], [1, 1], [2, 3]]), grad=True)
scatter_index = torch.tensor([[0, 1, 0], [2, 2, 1]])
case("aten.scatter.src", randn(3, 4), 0, scatter_index.T[:2], randn(3, 3))
case("aten.scatter.value", randn(3, 4), 1, scatter_index, 7.0)
case("aten.scatter_add.default", randn(3, 4), 1, scatter_index, randn(2, 3), grad=True)
for reduce in ["sum", "prod", "mean", "amax", "amin"]:
    for include_self in (True, False):
        case("aten.scatter_reduce.two", randn(3, 4), 1, scatter_index, randn(2, 3), reduce,
             include_self=include_self, id=f"scatter_reduce_{reduce}_{include_self}")

# --- reductions -----------------------------------------------------------------------------
case("aten.sum.dim_IntList", randn(3, 4, 5), [0, 2], True, grad=True)
case("aten.sum.dim_IntList", bools(3, 4), [1], id="sum_bools")
case("aten.sum.default", randn(3, 4), dtype=torch.float32)
case("aten.mean.dim", randn(3, 4, 5), [-1], grad=True)
case("aten.mean.default", randn(3, 4))
case("aten.prod.dim_int", rand(3, 4, low=0.5, high=1.5), 1, True, grad=True)
case("aten.prod.default", rand(3, 4, low=0.5, high=1.5))
ties = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]])
case("aten.amax.default", ties, [1], grad=True)
case("aten.amin.default", ties, [0, 1], True, grad=True)
case("aten.max.default", ties)
case("aten.min.default", ties)
case("aten.max.dim", ties, 1, grad=True)
case("aten.min.dim", ties, 0, True, grad=True)
case("aten.argmax.default", ties, 1)
case("aten.argmax.default", ties, id="argmax_flat")
case("aten.argmin.default", ties, 0, True)
case("aten.any.dim", bools(3, 4), 1)
case("aten.any.dims", bools(3, 4), [0, 1], True)
case("aten.any.default", bools(3, 4))
case("aten.all.dim", bools(3, 4), 0)
case("aten.all.dims", bools(3, 4), None)
case("aten.all.default", torch.ones(3, dtype=torch.bool))
case("aten.var.correction", randn(3, 4, 5), [1, 2], correction=0, keepdim=True, grad=True)
case("aten.var.correction", randn(3, 4), id="var_all")
case("aten.var.dim", randn(3, 4), [1], False)
case("aten.std.correction", randn(3, 4), [1], correction=1, grad=True)
case("aten.cumsum.default", randn(3, 4), 1, grad=True)
case("aten.cumsum.default", bools(3, 4), 0, id="cumsum_bools")
case("aten.cumprod.default", rand(3, 4, low=0.5, high=1.5), 0, grad=True)
case("aten.logsumexp.default", randn(3, 4), [1], grad=True)
case("aten._softmax.default", randn(3, 4), 1, False, grad=True)
case("aten._log_softmax.default", randn(3, 4), 0, False, grad=True)
zero_row = torch.cat([torch.zeros(1, 4), randn(2, 4)])
case("aten.linalg_vector_norm.default", zero_row, 2, [1], True, grad=True)
for order in (1, 3, 0, float("inf"), float("-inf")):
    case("aten.linalg_vector_norm.default", randn(3, 4), order, [1], id=f"norm_{order}")
case("aten.sort.default", randn(3, 5), 1, True, grad=True)
case("aten.sort.stable", randn(3, 5), stable=True, dim=0)
case("aten.topk.default", randn(3, 5), 2, 1, grad=True)
case("aten.topk.default", randn(3, 5), 2, 0, False, id="topk_smallest")

# --- layers ---------------------------------------------------------------------------------
case("aten.mm.default", randn(3, 4), randn(4, 2), grad=True)
case("aten.bmm.default", randn(2, 3, 4), randn(2, 4, 5), grad=True)
case("aten.matmul.default", randn(2, 3, 4), randn(4, 5), grad=True)
case("aten.addmm.default", randn(2), randn(3, 4), randn(4, 2), beta=0.5, alpha=2, grad=True)
case("aten.baddbmm.default", randn(2, 3, 5), randn(2, 3, 4), randn(2, 4, 5), grad=True)
CONV = [  # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    ("conv1d", (2, 4, 9), (6, 4, 3), True, [2], [1], [1], False, [0], 1),
    ("conv2d_few_pixels", (2, 4, 5, 5), (6, 2, 3, 3), True, [1, 1], [1, 1], [1, 1], False,
     [0, 0], 2),
    ("conv2d_many_pixels", (2, 3, 12, 12), (4, 3, 3, 3), True, [1, 1], [1, 2], [2, 1], False,
     [0, 0], 1),
    ("conv2d_1x1_stride", (2, 4, 12, 12), (3, 4, 1, 1), False, [2, 2], [0, 0], [1, 1], False,
     [0, 0], 1),
    ("conv3d", (1, 2, 4, 5, 5), (3, 2, 2, 3, 3), True, [1, 2, 1], [0, 1, 1], [1, 1, 1], False,
     [0, 0, 0], 1),
    ("conv_transpose2d", (2, 4, 5, 5), (4, 3, 3, 3), True, [2, 2], [1, 0], [1, 1], True,
     [1, 0], 2),
    ("conv_transpose1d", (2, 3, 6), (3, 2, 4), False, [3], [1], [2], True, [2], 1),
]
for cid, xs, ws, bias, *rest in CONV:
    case("aten.convolution.default", randn(*xs), randn(*ws), randn(ws[1] * rest[-1] if rest[3]
         else ws[0]) if bias else None, *rest, grad=True, id=cid)
stats = (rand(3, low=-1, high=1), rand(3, low=0.5, high=2))
case("aten._native_batch_norm_legit_no_training.default", randn(2, 3, 4, 4), rand(3) + 0.5,
     randn(3), *stats, 0.1, 1e-5, grad=True)
case("aten._native_batch_norm_legit.default", randn(2, 3), None, None, *stats, False, 0.1, 1e-3)
case("aten.native_layer_norm.default", randn(2, 3, 4, 5), [4, 5], randn(4, 5), randn(4, 5),
     1e-5, grad=True)
case("aten.native_layer_norm.default", randn(2, 5), [5], None, None, 1e-5, id="layer_norm_bare")
case("aten.native_group_norm.default", randn(2, 6, 3, 3), randn(6), randn(6), 2, 6, 9, 3, 1e-5,
     grad=True)
case("aten.embedding.default", randn(10, 4), torch.tensor([[0, 3, 0], [9, 2, 3]]), 0,
     grad=True)
case("aten.embedding.default", randn(10, 4), torch.tensor([1, 1, 5]), grad=True,
     id="embedding_no_padding")
case("aten.native_dropout.default", randn(*X), 0.5, False)
QKV = (randn(2, 2, 5, 4), randn(2, 2, 6, 4), randn(2, 2, 6, 3))
padding = torch.ones(2, 1, 5, 6, dtype=torch.bool)
padding[0, :, :, 4:] = False
padding[1, :, 2] = False  # a query that may attend nowhere: 0, not NaN, as in torch
case("aten.scaled_dot_product_attention.default", *QKV, grad=True, id="sdpa")
case("aten.scaled_dot_product_attention.default", *QKV, padding, grad=True, id="sdpa_bool_mask")
case("aten.scaled_dot_product_attention.default", *QKV, randn(5, 6), scale=0.3, grad=True,
     id="sdpa_float_mask")
case("aten.scaled_dot_product_attention.default", randn(1, 2, 5, 4), randn(1, 2, 5, 4),
     randn(1, 2, 5, 4), is_causal=True, grad=True, id="sdpa_causal")
case("aten.scaled_dot_product_attention.default", randn(1, 4, 5, 4), randn(1, 2, 5, 4),
     randn(1, 2, 5, 4), enable_gqa=True, grad=True, id="sdpa_gqa")
case("aten.max_pool2d_with_indices.default", randn(2, 3, 7, 7), [3, 3], [2, 2], [1, 1],
     grad=True)
case("aten.max_pool2d_with_indices.default", randn(2, 3, 8, 9), [2, 3], [2, 2], [0, 1],
     [2, 1], True, grad=True, id="max_pool2d_ceil_dilation")
case("aten.max_pool3d_with_indices.default", randn(1, 2, 5, 5, 5), [2, 2, 2], grad=True)
case("aten.avg_pool1d.default", randn(2, 3, 9), [3], [2], [1], True, False, grad=True)
case("aten.avg_pool2d.default", randn(2, 3, 7, 7), [3, 3], [2, 2], [1, 1], grad=True)
case("aten.avg_pool2d.default", randn(2, 3, 8, 7), [3, 2], [2, 2], [1, 1], True, True,
     grad=True, id="avg_pool2d_ceil_count_pad")
case("aten.avg_pool2d.default", randn(2, 3, 8, 7), [2, 2], [], [0, 0], False, True, 3,
     id="avg_pool2d_divisor")
case("aten.avg_pool3d.default", randn(1, 2, 5, 5, 5), [2, 2, 2], [1, 2, 2], [1, 0, 1], False,
     False, grad=True)
case("aten.adaptive_avg_pool1d.default", randn(2, 3, 10), [4], grad=True)
case("aten._adaptive_avg_pool2d.default", randn(2, 3, 7, 8), [3, 4], grad=True)
case("aten._adaptive_avg_pool2d.default", randn(2, 3, 7, 8), [1, 1], id="global_avg_pool")
case("aten._adaptive_avg_pool3d.default", randn(1, 2, 4, 5, 6), [2, 5, 4], grad=True)
case("aten.upsample_nearest1d.vec", randn(1, 2, 5), [8], None)
case("aten.upsample_nearest2d.vec", randn(1, 2, 3, 5), None, [2.0, 1.5], grad=True)
case("aten.upsample_nearest3d.vec", randn(1, 2, 2, 3, 3), [3, 3, 7], None)
case("aten.upsample_linear1d.vec", randn(1, 2, 5), [9], True, None, grad=True)
case("aten.upsample_bilinear2d.vec", randn(1, 2, 4, 5), [7, 8], False, None, grad=True)
case("aten.upsample_bilinear2d.vec", randn(1, 2, 4, 5), None, True, [2.0, 2.0],
     id="bilinear_align_scale")
case("aten.upsample_trilinear3d.vec", randn(1, 1, 2, 3, 4), [3, 5, 4], False, None)

# Python arithmetic on sizes: the table's entries ARE the operator module's functions.
PYTHON_OPS = {name for name in aten.SUPPORTED_OPS if name.startswith("operator.")}


def _jax(value):
    if isinstance(value, torch.Tensor):
        return jnp.asarray(to_numpy(value))
    if isinstance(value, (list, tuple)):
        return type(value)(_jax(v) for v in value)
    return value


def _torch_op(name):
    _, packet, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, packet), overload)


def _pairs(got, want):
    """(jax, torch) leaf pairs of the two results, skipping what the table leaves out."""
    if isinstance(want, (tuple, list)):
        return [p for g_, w in zip(got, want) for p in _pairs(g_, w)]
    return [] if got is None else [(got, want)]


@pytest.mark.parametrize("cid, name, args, kwargs, grad", CASES, ids=[c[0] for c in CASES])
def test_op_matches_torch(cid, name, args, kwargs, grad):
    want = _torch_op(name)(*args, **kwargs)
    got = aten.OPS[name](*_jax(args), **_jax(kwargs))
    got = like_torch(got, want, name)
    pairs = _pairs(got, want)
    if want is not None:
        assert pairs, f"{name} returned nothing to compare"
    for value, expected in pairs:
        if name.startswith("aten.empty"):  # uninitialised memory: shape and dtype only
            expected = to_numpy(expected)
            assert value.shape == expected.shape and value.dtype == expected.dtype
            continue
        if not isinstance(expected, torch.Tensor):
            assert value == expected
            continue
        expected = to_numpy(expected)
        assert value.shape == expected.shape and value.dtype == expected.dtype
        if np.issubdtype(expected.dtype, np.floating):
            np.testing.assert_allclose(np.asarray(value, np.float32), expected, rtol=1e-5,
                                       atol=1e-6 * max(1.0, np.abs(expected).max()))
        else:
            np.testing.assert_array_equal(np.asarray(value), expected)
    if grad:
        _check_vjp(name, args, kwargs)


# arguments torch does not differentiate (BatchNorm's running statistics)
NO_GRAD = {"aten._native_batch_norm_legit_no_training.default": {3, 4}}


def _check_vjp(name, args, kwargs):
    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)
             and a.is_floating_point() and i not in NO_GRAD.get(name, ())]
    leaves = [args[i].clone().requires_grad_(True) for i in slots]
    full = list(args)
    for i, leaf in zip(slots, leaves):
        full[i] = leaf
    out = _torch_op(name)(*full, **kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    cotangent = torch.randn(out.shape, generator=g)
    want = torch.autograd.grad(out, leaves, cotangent, allow_unused=True)

    def f(*values):
        jargs = list(_jax(args))
        for i, v in zip(slots, values):
            jargs[i] = v
        result = aten.OPS[name](*jargs, **_jax(kwargs))
        return result[0] if isinstance(result, (tuple, list)) else result

    _, vjp = jax.vjp(f, *[_jax(args[i]) for i in slots])
    for slot, got, expected in zip(slots, vjp(_jax(cotangent)), want):
        expected = np.zeros(got.shape) if expected is None else expected.numpy()
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4,
                                   atol=1e-5 * max(1.0, np.abs(expected).max()),
                                   err_msg=f"gradient of argument {slot}")


def test_cat_gradient_matches_torch():
    parts = [randn(2, 3).requires_grad_(True), randn(1, 3).requires_grad_(True)]
    cotangent = randn(3, 3)
    want = torch.autograd.grad(torch.cat(parts), parts, cotangent)
    _, vjp = jax.vjp(lambda a, b: aten.OPS["aten.cat.default"]([a, b]),
                     *[_jax(p.detach()) for p in parts])
    for got, expected in zip(vjp(_jax(cotangent)), want):
        np.testing.assert_allclose(np.asarray(got), expected.numpy())


def test_python_ops_are_the_operator_module():
    import operator

    for name in PYTHON_OPS:
        assert aten.OPS[name] is getattr(operator, name.split(".")[1])


def test_every_op_of_the_table_has_a_case():
    covered = {c[1] for c in CASES} | PYTHON_OPS | {r[0] for r in REFUSALS}
    assert sorted(set(aten.SUPPORTED_OPS) - covered) == []


REFUSALS = [
    ("aten._native_batch_norm_legit.no_stats", (randn(2, 3), None, None, False, 0.1, 1e-5),
     "track_running_stats"),
    ("aten._native_batch_norm_legit.default",
     (randn(2, 3), None, None, *stats, True, 0.1, 1e-5), "training mode"),
    ("aten.native_dropout.default", (randn(2, 3), 0.5, True), "dropout in training mode"),
    ("aten.embedding.default", (randn(4, 2), torch.tensor([1]), -1, True), "scale_grad_by_freq"),
    ("aten.scaled_dot_product_attention.default", (*QKV, None, 0.1), "dropout_p"),
    ("aten.index.Tensor", (randn(3), [torch.tensor([True, False, True])]), "boolean mask"),
    ("aten._to_copy.default", (randn(3),), "complex64"),
]


@pytest.mark.parametrize("name, args, match", REFUSALS)
def test_refusals_name_the_reason(name, args, match):
    kwargs = {"dtype": torch.complex64} if name == "aten._to_copy.default" else {}
    with pytest.raises(aten.UnsupportedOpError, match=match) as info:
        aten.OPS[name](*_jax(args), **kwargs)
    assert 'backend="torch"' in str(info.value)


def test_dtypes_follow_jax_x64_setting():
    # torch's int64 is JAX's int32 unless x64 is on, as everywhere in JAX
    assert aten.OPS["aten.arange.default"](5, dtype=torch.int64).dtype == jnp.int32
    assert math.isclose(float(aten.OPS["aten.scalar_tensor.default"](0.5)), 0.5)
