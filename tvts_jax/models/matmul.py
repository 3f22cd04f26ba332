"""Every Linear's matmul (`dense`), with the custom VJPs that keep XLA:CPU on its fast kernels.

Everywhere but on XLA:CPU `dense` is the plain `x @ w + b` in the compute dtype. On CPU the
forward and both gradient matmuls go through `_cpu_dense`, whose backward pass lays the weight
gradient out for XLA:CPU's row-major matmul (`_cpu_weight_grad`) and keeps bfloat16 matmuls
returning float32 (the only bfloat16 matmul XLA:CPU runs natively). docs/performance.md has
the measurements behind each choice.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from tvts_jax.models import platform


def _f32_dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] in the operands' dtype, accumulated and returned in float32."""
  return jnp.matmul(x, w, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_dense(x: jax.Array, w: jax.Array, b: jax.Array | None,
               operands: Any) -> jax.Array:
  return _cpu_dense_fwd(x, w, b, operands)[0]


def _cpu_dense_fwd(x, w, b, operands):
  xo, wo = x.astype(operands), w.astype(operands)
  y = _f32_dot(xo, wo)
  return (y if b is None else y + b), (xo, wo, b)


def _cpu_dense_bwd(operands, residuals, g):
  xo, wo, b = residuals
  g2 = g.reshape(-1, g.shape[-1])
  db = None if b is None else jnp.sum(g2, axis=0)
  go = g.astype(operands)
  dx = _f32_dot(go, wo.T)
  dw = _cpu_weight_grad(xo.reshape(-1, xo.shape[-1]), go.reshape(-1, go.shape[-1]))
  return dx, dw, db


def _cpu_weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """x [M, K]^T @ g [M, N] -> [K, N] float32, from bfloat16 or float32 operands, on XLA:CPU.

  A matmul that contracts the leading (token) dimension of both operands, as every weight
  gradient does, is one XLA:CPU's fast kernels (YNNPACK) do not take: in bfloat16 it converts
  both operands to float32 and runs at the float32 rate, plus two conversion passes; in
  float32 it runs in Eigen, slower than YNNPACK's row-major matmul. A transposed x^T would be
  folded back into the matmul's dimension numbers (or laid out column-major, the same thing),
  so x^T is written out padded with one zero row, which the compiler materialises as a
  row-major [K+1, M] copy; the product's extra row is dropped.
  When N < K the smaller g^T is copied instead and the [N, K] product transposed
  (docs/performance.md has the effect on the step).
  """
  pad = lambda a: jax.lax.pad(a.T, jnp.zeros((), a.dtype), [(0, 1, 0), (0, 0, 0)])
  if g.shape[1] < x.shape[1]:
    return _f32_dot(pad(g), x)[:-1].T
  return _f32_dot(pad(x), g)[:-1]


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None, dtype: Any) -> jax.Array:
  """x [..., K] @ w [K, N] + b [N] with `dtype` matmul operands: every Linear of the model.

  Returns:
    [..., N] in `platform.activation_dtype(dtype)`.

  Everywhere but on CPU this is `x.astype(dtype) @ w.astype(dtype) + b.astype(dtype)`, as in
  nnx.Linear. XLA:CPU runs a bfloat16 x bfloat16 matmul natively (AVX512-BF16 / AMX, about
  twice its float32 rate) only when it accumulates into and returns float32 (one returning
  bfloat16 it rewrites to float32 x float32), so there, for bfloat16, the three matmuls of
  the forward and backward pass take bfloat16 operands (the cotangent rounded once) and
  return float32, the bias is added and its gradient summed in float32, and the bfloat16
  copies of x and w are what the backward pass keeps. On CPU, in both dtypes, the weight
  gradient is computed as `_cpu_weight_grad` lays it out for XLA:CPU's fast matmul.
  """
  dtype = jnp.dtype(dtype)
  if dtype in (jnp.bfloat16, jnp.float32) and platform.on_cpu() and w.ndim == 2:
    return _cpu_dense(x.astype(jnp.float32), w.astype(jnp.float32),
                      None if b is None else b.astype(jnp.float32), dtype)
  y = x.astype(dtype) @ w.astype(dtype)
  return y if b is None else y + b.astype(dtype)
