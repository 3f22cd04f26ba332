"""The one transformer block shared by the video tower, the text tower and the sorter.

`Block` is a pre-LayerNorm ViT block (timm / MAE layout and names):

    x = x + attn(norm1(x))        attn: fused qkv Linear (with bias) -> softmax attention -> proj
    x = x + mlp(norm2(x))         mlp:  fc1 -> exact GELU -> fc2

`BlockStack` runs `depth` blocks, either as a Python list (`layers/0/...`, `layers/1/...`) or,
with `scan_layers=True`, as one block whose parameters carry a leading `[depth]` axis, run with
`jax.lax.scan` so that compile time does not grow with depth. `to_scanned_layout` and
`to_list_layout` convert a parameter dict between the two layouts (checkpoints, converters and
the exporter can then use one layout whatever the training config was).

Mixed precision: parameters are stored in `param_dtype` (float32); matmul operands are cast to
the compute `dtype` (float32 or bfloat16) and the residual stream runs in
`activation_dtype(dtype)`: the compute dtype, except float32 for bfloat16 on CPU (see there).
LayerNorm statistics are computed in float32 by flax whatever `dtype` is, and
`jax.nn.dot_product_attention` does its softmax in float32.

Attention runs through `jax.nn.dot_product_attention` with the `implementation` chosen by the
config (`model.attention`, resolved by `resolve_attention`): 'xla' (every backend) or 'cudnn'
(cuDNN's fused flash-attention kernel, NVIDIA GPUs in bfloat16; `check_attention_backend` says
so before anything compiles); 'auto' (the default) is 'cudnn' where it can run, else 'xla'.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tvts_jax import config_schema

# Per-block rematerialisation policies, by config name (`model.remat`). 'none' is no
# jax.checkpoint at all; 'full' saves nothing but the block's inputs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# MAE / timm initialise Linear kernels with xavier_uniform.
_xavier = jax.nn.initializers.xavier_uniform()


# The platform the model is built for when it is not the default backend's: set by
# `set_target_platform` for ahead-of-time compiles for other hardware (tvts_jax/aot.py).
_target_platform: str | None = None


def set_target_platform(platform: str | None) -> None:
  """Builds the model for `platform` ('cpu' or 'cuda'; None: the default backend) from now on.

  For compiling for hardware this process does not drive (tvts_jax/aot.py): the CPU-only and
  GPU-only choices below then follow the target, not the host.
  """
  global _target_platform
  if platform not in (None, "cpu", "cuda"):
    raise ValueError(f"target platform {platform!r}; must be None, 'cpu' or 'cuda'")
  _target_platform = platform


def on_cpu() -> bool:
  """Whether the model is being built for XLA:CPU (the CPU-only choices below key on it)."""
  if _target_platform is not None:
    return _target_platform == "cpu"
  return jax.default_backend() == "cpu"


def on_cuda_gpu() -> bool:
  """Whether the model is being built for an NVIDIA GPU (where cuDNN attention exists)."""
  if _target_platform is not None:
    return _target_platform == "cuda"
  if jax.default_backend() != "gpu":
    return False
  return "cuda" in getattr(jax.devices()[0].client, "platform_version", "").lower()


def check_attention_backend(attention: str) -> None:
  """Raises ConfigError if `attention` cannot run on the platform the model is built for.

  'cudnn' needs an NVIDIA GPU; failing here names the config key instead of failing inside
  the compiler with a cuDNN message.
  """
  if attention == "cudnn" and not on_cuda_gpu():
    raise config_schema.ConfigError(
        f"model.attention='cudnn' needs an NVIDIA GPU, but the backend is "
        f"{jax.default_backend()!r}; use model.attention='auto' (the default: cuDNN on NVIDIA "
        "GPUs, XLA elsewhere) or 'xla' here (the parameters are the same, so a checkpoint "
        "trained with one loads with any)")


# What `Attention` and `BlockStack` take: `model.attention` after `resolve_attention`.
ATTENTION_KERNELS = ("xla", "cudnn")


def resolve_attention(config: Any) -> str:
  """The attention implementation a model of `config` is built with, 'xla' or 'cudnn'.

  `model.attention` as set, except 'auto': 'cudnn' when the model is built for an NVIDIA GPU
  and cuDNN can run it (`config_schema.cudnn_attention_problem`: bfloat16, head dimensions a
  multiple of 8 up to 128), else 'xla'. So a config or an export moves between a GPU and a CPU
  without edits, and a GPU run gets the fused kernel (on an H200 at the paper's batch: 1.37x
  the step rate of 'xla', 2/3 of its memory; README, Benchmark).
  """
  attention = config.model.attention
  if attention != "auto":
    return attention
  if on_cuda_gpu() and config_schema.cudnn_attention_problem(config) is None:
    return "cudnn"
  return "xla"


def activation_dtype(compute_dtype: Any) -> jnp.dtype:
  """The dtype of the residual stream and the elementwise work for a compute dtype.

  The compute dtype itself, except bfloat16 on XLA:CPU: there bfloat16 elementwise arithmetic
  is emulated (converted op by op, and bfloat16 reductions run as pairwise reduce-windows),
  slower than float32. So on CPU activations stay float32 and only the matmul operands are
  bfloat16 (`dense`), which is what a TPU does with float32 matmuls at default precision.
  """
  dtype = jnp.dtype(compute_dtype)
  if dtype == jnp.bfloat16 and on_cpu():
    return jnp.dtype(jnp.float32)
  return dtype


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
  When N < K the smaller g^T is copied instead and the [N, K] product transposed. On the
  small config: the bf16 step 137 -> 120 ms, the fp32 step 120 -> 109 ms (README, Benchmark).
  """
  pad = lambda a: jax.lax.pad(a.T, jnp.zeros((), a.dtype), [(0, 1, 0), (0, 0, 0)])
  if g.shape[1] < x.shape[1]:
    return _f32_dot(pad(g), x)[:-1].T
  return _f32_dot(pad(x), g)[:-1]


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None, dtype: Any) -> jax.Array:
  """x [..., K] @ w [K, N] + b [N] with `dtype` matmul operands: every Linear of the model.

  Returns:
    [..., N] in `activation_dtype(dtype)`.

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
  if dtype in (jnp.bfloat16, jnp.float32) and on_cpu() and w.ndim == 2:
    return _cpu_dense(x.astype(jnp.float32), w.astype(jnp.float32),
                      None if b is None else b.astype(jnp.float32), dtype)
  y = x.astype(dtype) @ w.astype(dtype)
  return y if b is None else y + b.astype(dtype)


class Linear(nnx.Linear):
  """nnx.Linear (same parameters, names and init) computing through `dense`: the matmul
  operands in `dtype`, the result in `activation_dtype(dtype)`. nnx.Linear's `precision`,
  `dot_general`, `preferred_element_type` and `promote_dtype` hooks are not used."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    bias = self.bias[...] if self.bias is not None else None
    return dense(inputs, self.kernel[...], bias, self.dtype or inputs.dtype)


# MAE initialises the fused qkv as three separate [D, D] xavier matrices: a uniform limit of
# sqrt(6 / (D + D)). On the fused [D, 3D] kernel fan_avg is 2D, so scale 2 gives that limit.
_qkv_init = jax.nn.initializers.variance_scaling(2.0, "fan_avg", "uniform")


def layer_norm(width: int, eps: float, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """A LayerNorm with float32 parameters whose output is in `dtype`.

  The two-pass variance (`use_fast_variance=False`) matches PyTorch's LayerNorm, which keeps
  converted reference checkpoints numerically close.
  """
  return nnx.LayerNorm(width, epsilon=eps, dtype=activation_dtype(dtype),
                      param_dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


def linear(in_features: int, out_features: int, dtype: Any, rngs: nnx.Rngs,
           kernel_init=_xavier) -> Linear:
  """A Linear with float32 parameters (kernel [in, out], bias [out]) computing in `dtype`
  (see `dense`)."""
  return Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
                kernel_init=kernel_init, bias_init=jax.nn.initializers.zeros, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection.

  Parameters: `qkv.kernel` [D, 3D] whose output columns are ordered (q|k|v, head, head_dim)
  exactly like timm's `qkv.weight.T`, `qkv.bias` [3D], `proj.kernel` [D, D], `proj.bias` [D].
  """

  def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs,
               attention: str = "xla"):
    if width % num_heads:
      raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
    if attention not in ATTENTION_KERNELS:
      raise ValueError(f"attention={attention!r}; must be one of {ATTENTION_KERNELS} "
                       "('auto' is resolved by resolve_attention)")
    self.num_heads = num_heads
    self.attention = attention
    self.qkv = linear(width, 3 * width, dtype, rngs, kernel_init=_qkv_init)
    self.proj = linear(width, width, dtype, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               num_queries: int | None = None) -> jax.Array:
    """Attends over the sequence.

    Args:
      x: [B, S, D] tokens.
      mask: optional bool [B, S] key-padding mask, True where a key may be attended to. A row
        with no True key attends uniformly (finite output), it does not produce NaN. With
        the 'cudnn' implementation the mask must be a prefix (padding at the end, as the
        tokenizer pads) with at least one True key: it is passed as lengths.
      num_queries: only the first `num_queries` tokens attend (all S by default); every
        token is still a key and a value.

    Returns:
      [B, num_queries or S, D] in `activation_dtype` of the module's compute dtype.
    """
    b, s, d = x.shape
    h = self.num_heads
    if num_queries is None:
      qkv = self.qkv(x).reshape(b, s, 3, h, d // h)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      num_queries = s
    else:
      # The q columns of the fused kernel on the queried rows only, k|v on every row: what
      # `self.qkv` computes for the rows that are used.
      kernel, bias, dtype = self.qkv.kernel[...], self.qkv.bias[...], self.qkv.dtype
      q = dense(x[:, :num_queries], kernel[:, :d], bias[:d], dtype).reshape(
          b, num_queries, h, d // h)
      kv = dense(x, kernel[:, d:], bias[d:], dtype).reshape(b, s, 2, h, d // h)
      k, v = kv[:, :, 0], kv[:, :, 1]
    # One entry point for every backend, the softmax in float32 whatever the dtype.
    if self.attention == "cudnn":
      out = cudnn_attention(q, k, v, mask)
    else:
      out = jax.nn.dot_product_attention(
          q, k, v, mask=None if mask is None else mask[:, None, None, :],
          implementation=self.attention)
    return self.proj(out.reshape(b, num_queries, d))


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: jax.Array | None) -> jax.Array:
  """`jax.nn.dot_product_attention(implementation='cudnn')` for any sequence lengths.

  Two limits of jax's cuDNN path (jax 0.10) are worked around here, exactly:
  - Under differentiation it accepts only even query and key lengths (and our lengths are
    odd: 1 + kept patches, K + video tokens, one read-out query). An odd length gets one zero
    row: a padded query row is dropped from the output, a padded key is masked out by
    `key_value_seq_lengths`.
  - Key padding goes in as one length per row (a boolean mask would become an additive bias,
    which cuDNN accepts only at full [queries, keys] size). Transcripts are padded at the end,
    so the count of real tokens is the length: `mask` must be a prefix, with a True key.

  Args:
    q: [B, T, heads, head_dim]; k, v: [B, S, heads, head_dim].
    mask: optional bool [B, S] key-padding mask (a prefix per row).

  Returns:
    [B, T, heads, head_dim].
  """
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  lengths = (jnp.sum(mask, axis=-1, dtype=jnp.int32) if mask is not None
             else jnp.full((b,), s, jnp.int32) if s % 2 else None)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x
  out = jax.nn.dot_product_attention(pad(q, t % 2), pad(k, s % 2), pad(v, s % 2),
                                     key_value_seq_lengths=lengths, implementation="cudnn")
  return out[:, :t]


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), as torch.nn.GELU() computes it: 0.5 x (1 + erf(x / sqrt 2)).

  `jax.nn.gelu(approximate=False)` computes the same function with erfc, whose XLA:CPU
  expansion (two branches and an exp) made GELU and its gradient several times slower than
  erf's polynomial; the two agree to within 1e-6.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU, as torch.nn.GELU() in the reference -> fc2."""

  def __init__(self, width: int, mlp_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = linear(width, mlp_dim, dtype, rngs)
    self.fc2 = linear(mlp_dim, width, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))


@jax.custom_vjp
def _grad_fusion_barrier(x: jax.Array) -> jax.Array:
  return x


def _grad_fusion_barrier_fwd(x):
  return x, None


def _grad_fusion_barrier_bwd(_, g):
  # A conditional is a fusion boundary that XLA keeps (optimization_barrier is expanded away
  # before fusion). Both branches give g whenever it is finite; the NaN branch can only make a
  # gradient that already has a NaN all-NaN, and such a step is skipped either way.
  first = g.reshape(-1)[0]
  return (jax.lax.cond(first == first, lambda t: t, lambda t: jnp.full_like(t, jnp.nan), g),)


_grad_fusion_barrier.defvjp(_grad_fusion_barrier_fwd, _grad_fusion_barrier_bwd)


def grad_fusion_barrier(x: jax.Array) -> jax.Array:
  """The identity; on CPU its gradient is computed once and stored, never fused onward.

  The residual stream's gradient at block i sums the contributions of every later block.
  XLA:CPU fused that elementwise sum (LayerNorm backward included) into each of its
  consumers, among them the transposes feeding the weight-gradient matmuls, so every block
  recomputed the whole chain above it: work quadratic in depth (1.2 s of a 4.7 s step of the
  paper config). Storing it once per block is what GPUs and TPUs do anyway, and a
  conditional there would cost a device-host round trip, so only CPU gets the barrier.
  """
  if not on_cpu():
    return x
  return _grad_fusion_barrier(x)


class Block(nnx.Module):
  """Pre-LN transformer block: norm1, attn, norm2, mlp (timm names)."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, ln_eps: float,
               dtype: Any = jnp.float32, attention: str = "xla", rngs: nnx.Rngs):
    """Creates the block.

    Args:
      width: model width D.
      num_heads: attention heads; must divide `width`.
      mlp_dim: hidden width of the MLP.
      ln_eps: LayerNorm epsilon.
      dtype: compute dtype of the matmuls; the residual stream is in activation_dtype(dtype).
      attention: the attention implementation, one of `ATTENTION_KERNELS`.
      rngs: parameter initialisation.
    """
    self.dtype = activation_dtype(dtype)
    self.norm1 = layer_norm(width, ln_eps, dtype, rngs)
    self.attn = Attention(width, num_heads, dtype=dtype, attention=attention, rngs=rngs)
    self.norm2 = layer_norm(width, ln_eps, dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               num_queries: int | None = None) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, S, D] tokens (cast to the activation dtype).
      mask: optional bool [B, S] key-padding mask (see `Attention`).
      num_queries: compute the output of the first `num_queries` tokens only (all by
        default); the others still serve as keys and values.

    Returns:
      [B, num_queries or S, D] in the activation dtype.
    """
    x = grad_fusion_barrier(x.astype(self.dtype))
    residual = x if num_queries is None else x[:, :num_queries]
    x = residual + self.attn(self.norm1(x), mask, num_queries)
    return x + self.mlp(self.norm2(x))


class BlockStack(nnx.Module):
  """`depth` Blocks applied in sequence, as a list or scanned, with optional remat.

  Parameter layout (under the attribute `layers`):
    scan_layers=False: `layers/<i>/<block params>`, one subtree per block.
    scan_layers=True:  `layers/<block params>`, every leaf with a leading [depth] axis.
  """

  def __init__(self, depth: int, width: int, num_heads: int, mlp_dim: int, *,
               ln_eps: float, dtype: Any = jnp.float32, scan_layers: bool = False,
               remat: str = "none", attention: str = "xla", rngs: nnx.Rngs):
    """Creates the stack.

    Args:
      depth: number of blocks (>= 1).
      width: model width D.
      num_heads: attention heads.
      mlp_dim: MLP hidden width.
      ln_eps: LayerNorm epsilon.
      dtype: compute dtype.
      scan_layers: store stacked parameters and run them with `jax.lax.scan`.
      remat: a key of `REMAT_POLICIES`; each block is rematerialised under that policy.
      attention: the attention implementation, one of `ATTENTION_KERNELS`.
      rngs: parameter initialisation.
    """
    if depth < 1:
      raise ValueError(f"depth must be >= 1, got {depth}")
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; must be one of {tuple(REMAT_POLICIES)}")
    self.depth = depth
    self.scan_layers = scan_layers
    self.remat = remat
    self.attention = attention

    def make_block(rngs):
      return Block(width, num_heads, mlp_dim, ln_eps=ln_eps, dtype=dtype, attention=attention,
                   rngs=rngs)

    if scan_layers:
      # vmap over split rng streams: `depth` independently initialised blocks whose
      # parameters are stacked on a new leading axis.
      self.layers = nnx.split_rngs(splits=depth)(
          nnx.vmap(make_block, in_axes=(0,), out_axes=0))(rngs)
    else:
      self.layers = nnx.List([make_block(rngs) for _ in range(depth)])

  def _remat(self, fn, in_scan: bool = False):
    if self.remat == "none":
      return fn
    # Inside scan the loop already prevents XLA from CSE-ing the recomputation away, and
    # prevent_cse=True would only block optimisations there (jax.checkpoint docs).
    return jax.checkpoint(fn, policy=REMAT_POLICIES[self.remat], prevent_cse=not in_scan)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               num_queries: int | None = None) -> jax.Array:
    """Applies the blocks in order.

    Args:
      x: [B, S, D] tokens.
      mask: optional bool [B, S] key-padding mask, shared by all blocks.
      num_queries: the caller reads only the first `num_queries` output tokens, so the last
        block computes only those (keys and values still come from every token): most of
        its work when a stack is read out at a few positions (text tower, sorter).

    Returns:
      [B, num_queries or S, D] in the compute dtype.
    """
    s = x.shape[1]
    if self.attention != "cudnn" or s % 2 == 0:
      return self._apply(x, mask, num_queries)
    # cuDNN's attention takes only even lengths under differentiation. One zero token, a key
    # masked out in every block, makes the whole stack's sequence even: one pad and one slice
    # instead of padding q, k and v and slicing the output in every block (those pads and
    # slices were 6.1 of the 201 ms of kernels in a profile of the paper config's bf16 step at
    # batch 256 on an H200). The extra row's outputs are dropped; the rest is exactly what the
    # odd-length stack computes.
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    mask = jnp.ones((x.shape[0], s), bool) if mask is None else mask
    mask = jnp.pad(mask, ((0, 0), (0, 1)))  # the new key: False
    out = self._apply(x, mask, num_queries)
    return out if num_queries is not None else out[:, :s]

  def _apply(self, x: jax.Array, mask: jax.Array | None,
             num_queries: int | None) -> jax.Array:
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)

      def body(h, block_state):
        return nnx.merge(graphdef, block_state)(h, mask), None

      # The carry must keep one dtype across iterations.
      x = x.astype(self.layers.dtype)
      if num_queries is None:
        x, _ = jax.lax.scan(self._remat(body, in_scan=True), x, state)
        return x
      if self.depth > 1:
        x, _ = jax.lax.scan(self._remat(body, in_scan=True), x,
                            jax.tree.map(lambda a: a[:-1], state))
      last = jax.tree.map(lambda a: a[-1], state)
      return self._remat(lambda s, h, m: nnx.merge(graphdef, s)(h, m, num_queries))(
          last, x, mask)

    for i, block in enumerate(self.layers):
      queries = num_queries if i == self.depth - 1 else None
      if self.remat == "none":
        x = block(x, mask, queries)
      else:
        graphdef, state = nnx.split(block)
        x = self._remat(lambda s, h, m, g=graphdef, q=queries: nnx.merge(g, s)(h, m, q))(
            state, x, mask)
    return x


def _is_list_layout(tree: Mapping[Any, Any]) -> bool:
  return bool(tree) and all(str(k).isdigit() for k in tree.keys())


def stack_layers(layers: Mapping[Any, Any]) -> Any:
  """Stacks per-block parameter trees {0: tree, 1: tree, ...} into one [depth, ...] tree."""
  ordered = [layers[k] for k in sorted(layers, key=int)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)


def unstack_layers(stacked: Any) -> dict[int, Any]:
  """Splits a [depth, ...] parameter tree into per-block trees {0: tree, 1: tree, ...}."""
  depth = jax.tree.leaves(stacked)[0].shape[0]
  return {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)}


def _relayout(tree: Any, scanned: bool) -> Any:
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers" and isinstance(value, Mapping):
      if scanned and _is_list_layout(value):
        value = stack_layers(value)
      elif not scanned and not _is_list_layout(value):
        value = unstack_layers(value)
      out[key] = value
    else:
      out[key] = _relayout(value, scanned)
  return out


def to_scanned_layout(params: Mapping[str, Any]) -> dict[str, Any]:
  """Converts every BlockStack in a nested parameter dict to the scan_layers=True layout.

  Args:
    params: a pure nested dict (e.g. `nnx.state(model, nnx.Param).to_pure_dict()`) in either
      layout; stacks already scanned are left as they are.

  Returns:
    The same tree with every `layers` subtree stacked along a new leading [depth] axis.
  """
  return _relayout(params, scanned=True)


def to_list_layout(params: Mapping[str, Any]) -> dict[str, Any]:
  """Converts every BlockStack in a nested parameter dict to the scan_layers=False layout.

  Args:
    params: a pure nested dict in either layout.

  Returns:
    The same tree with every stacked `layers` subtree split into `layers/<i>/...` (int keys).
  """
  return _relayout(params, scanned=False)
