"""The one transformer block shared by the video tower, the text tower and the sorter.

`Block` is a ViT block (timm / MAE layout and names), pre-LayerNorm by default:

    x = x + attn(norm1(x))        attn: fused qkv Linear (with bias) -> softmax attention -> proj
    x = x + mlp(norm2(x))         mlp:  fc1 -> exact GELU (or QuickGELU) -> fc2

or post-LayerNorm (`norm_position='post'`, BERT / DistilBERT's arithmetic, same parameters):

    x = norm1(x + attn(x))
    x = norm2(x + mlp(x))

or, for a video's tokens with divided space-time attention (`temporal_frames=F`, TVTSv2's
block, with its own `time_norm` and a `time_attn` whose output is exactly zero at init):

    t = x + time_attn(time_norm(x))      each patch with its spatial slot in every frame, + CLS
    x = x + attn(norm1(t))               each patch with its own frame, + CLS; the residual is
    x = x + mlp(norm2(x))                x, not t: time reaches the stream through attn's input

`BlockStack` runs `depth` blocks, either as a Python list (`layers/0/...`, `layers/1/...`) or,
with `scan_layers=True`, as one block whose parameters carry a leading `[depth]` axis, run with
`jax.lax.scan` so that compile time does not grow with depth. `to_scanned_layout` and
`to_list_layout` convert a parameter dict between the two layouts (checkpoints, converters and
the exporter can then use one layout whatever the training config was).

Mixed precision: parameters are stored in `param_dtype` (float32); matmul operands are cast to
the compute `dtype` (float32 or bfloat16) and the residual stream runs in
`platform.activation_dtype(dtype)`: the compute dtype, except float32 for bfloat16 on CPU
(see there). Every Linear multiplies through `matmul.dense`.
LayerNorm statistics are computed in float32 by flax whatever `dtype` is, and
`jax.nn.dot_product_attention` does its softmax in float32.

Attention runs through `jax.nn.dot_product_attention` with the `implementation` chosen by the
config (`model.attention`, resolved by `platform.resolve_attention`): 'xla' (every backend) or
'cudnn' (cuDNN's fused flash-attention kernel, NVIDIA GPUs in bfloat16;
`platform.check_attention_backend` says so before anything compiles); 'auto' (the default) is 'cudnn' where it can run, else 'xla'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tvts_jax.models import platform
from tvts_jax.models.matmul import dense

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


class Linear(nnx.Linear):
  """nnx.Linear (same parameters, names and init) computing through `dense`: the matmul
  operands in `dtype`, the result in `platform.activation_dtype(dtype)`. nnx.Linear's `precision`,
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
  return nnx.LayerNorm(width, epsilon=eps, dtype=platform.activation_dtype(dtype),
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

  Besides plain (joint) attention over the sequence, it attends in groups of a video's tokens
  laid out `[CLS, frame 0's n patches, frame 1's, ...]` (`groups=('space' | 'time', frames)`,
  divided space-time attention as in TVTSv2 / Frozen-in-Time): a patch attends to the CLS token
  and to the patches of its own frame ('space') or of its own spatial slot in every frame
  ('time'); the CLS token attends to every token. n is read off the sequence length (the kept
  tokens), never assumed from a mask ratio.
  """

  def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs,
               attention: str = "xla", zero_init: bool = False):
    """Creates the layer.

    Args:
      width: model width D.
      num_heads: attention heads; must divide `width`.
      dtype: compute dtype of the matmuls.
      rngs: parameter initialisation.
      attention: the implementation, one of `platform.ATTENTION_KERNELS`.
      zero_init: qkv all zeros and proj's kernel all ones (TVTSv2's temporal attention): the
        output is exactly zero at init, and the value columns of qkv get a gradient through
        the all-ones projection (with a zero projection nothing would).
    """
    if width % num_heads:
      raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
    if attention not in platform.ATTENTION_KERNELS:
      raise ValueError(f"attention={attention!r}; must be one of {platform.ATTENTION_KERNELS} "
                       "('auto' is resolved by resolve_attention)")
    self.num_heads = num_heads
    self.attention = attention
    zeros, ones = jax.nn.initializers.zeros, jax.nn.initializers.ones
    self.qkv = linear(width, 3 * width, dtype, rngs, kernel_init=zeros if zero_init else _qkv_init)
    self.proj = linear(width, width, dtype, rngs, kernel_init=ones if zero_init else _xavier)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               num_queries: int | None = None, *, query_index: jax.Array | None = None,
               causal: bool = False, groups: tuple[str, int] | None = None) -> jax.Array:
    """Attends over the sequence.

    Args:
      x: [B, S, D] tokens.
      mask: optional bool [B, S] key-padding mask, True where a key may be attended to. A row
        with no True key attends uniformly (finite output), it does not produce NaN. With
        the 'cudnn' implementation the mask must be a prefix (padding at the end, as the
        tokenizers pad) with at least one True key: it is passed as lengths.
      num_queries: only the first `num_queries` tokens attend (all S by default); every
        token is still a key and a value.
      query_index: int [B]: only this token of each row attends (one query a row); every
        token is still a key and a value.
      causal: token i attends to tokens <= i only.
      groups: ('space' | 'time', frames): divided space-time attention (class docstring).

    Returns:
      [B, Q, D] in `activation_dtype` of the module's compute dtype: Q = num_queries, 1 with
      `query_index`, else S.
    """
    b, s, d = x.shape
    h = self.num_heads
    if num_queries is None and query_index is None:
      qkv = self.qkv(x).reshape(b, s, 3, h, d // h)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      # The q columns of the fused kernel on the queried rows only, k|v on every row: what
      # `self.qkv` computes for the rows that are used.
      rows = (x[:, :num_queries] if query_index is None
              else jnp.take_along_axis(x, query_index[:, None, None], axis=1))
      kernel, bias, dtype = self.qkv.kernel[...], self.qkv.bias[...], self.qkv.dtype
      q = dense(rows, kernel[:, :d], bias[:d], dtype).reshape(b, rows.shape[1], h, d // h)
      kv = dense(x, kernel[:, d:], bias[d:], dtype).reshape(b, s, 2, h, d // h)
      k, v = kv[:, :, 0], kv[:, :, 1]
    if groups is not None:
      out = self._grouped(q, k, v, *groups)
    else:
      out = self._attend(q, k, v, mask, causal)
    return self.proj(out.reshape(b, q.shape[1], d))

  def _attend(self, q, k, v, mask, causal=False):
    # One entry point for every backend, the softmax in float32 whatever the dtype.
    if self.attention == "cudnn":
      return cudnn_attention(q, k, v, mask, causal)
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[:, None, None, :], is_causal=causal,
        implementation=self.attention)

  def _grouped(self, q, k, v, kind: str, frames: int):
    """Divided space-time attention over [CLS, frames x n patches] (see the class)."""
    if kind not in ("space", "time"):
      raise ValueError(f"groups={kind!r}; must be 'space' or 'time'")
    b, s, h, hd = q.shape
    n = (s - 1) // frames
    if n * frames != s - 1:
      raise ValueError(f"{s - 1} patch tokens do not split into {frames} frames")
    cls_out = self._attend(q[:, :1], k, v, None)  # the CLS token attends to every token

    def split(a):  # [B, frames, n, h, hd], or [B, n, frames, h, hd] to group by slot
      a = a[:, 1:].reshape(b, frames, n, h, hd)
      return a.transpose(0, 2, 1, 3, 4) if kind == "time" else a

    pq, pk, pv = split(q), split(k), split(v)
    groups, size = pq.shape[1], pq.shape[2]
    # Every group's keys and values start with the CLS token's.
    with_cls = lambda a, p: jnp.concatenate(
        [jnp.broadcast_to(a[:, None, :1], (b, groups, 1, h, hd)), p], axis=2).reshape(
            b * groups, size + 1, h, hd)
    out = self._attend(pq.reshape(b * groups, size, h, hd), with_cls(k, pk), with_cls(v, pv),
                       None).reshape(b, groups, size, h, hd)
    if kind == "time":
      out = out.transpose(0, 2, 1, 3, 4)
    return jnp.concatenate([cls_out, out.reshape(b, frames * n, h, hd)], axis=1)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: jax.Array | None, causal: bool = False) -> jax.Array:
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
    causal: query i attends to keys <= i (T == S; a padded row is last, so it changes nothing).

  Returns:
    [B, T, heads, head_dim].
  """
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  lengths = (jnp.sum(mask, axis=-1, dtype=jnp.int32) if mask is not None
             else jnp.full((b,), s, jnp.int32) if s % 2 else None)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x
  out = jax.nn.dot_product_attention(pad(q, t % 2), pad(k, s % 2), pad(v, s % 2),
                                     key_value_seq_lengths=lengths, is_causal=causal,
                                     implementation="cudnn")
  return out[:, :t]


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), as torch.nn.GELU() computes it: 0.5 x (1 + erf(x / sqrt 2)).

  `jax.nn.gelu(approximate=False)` computes the same function with erfc, whose XLA:CPU
  expansion (two branches and an exp) made GELU and its gradient several times slower than
  erf's polynomial; the two agree to within 1e-6.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(np.asarray(1.702, x.dtype) * x)


# `activation` option of Mlp / Block / BlockStack -> the function.
ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}
NORM_POSITIONS = ("pre", "post")


class Mlp(nnx.Module):
  """fc1 -> activation (exact erf GELU, as torch.nn.GELU(); or QuickGELU) -> fc2."""

  def __init__(self, width: int, mlp_dim: int, *, dtype: Any, rngs: nnx.Rngs,
               activation: str = "gelu"):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r}; must be one of {tuple(ACTIVATIONS)}")
    self.activation = activation
    self.fc1 = linear(width, mlp_dim, dtype, rngs)
    self.fc2 = linear(mlp_dim, width, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


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
  recomputed the whole chain above it: work quadratic in depth. Storing it once per block is
  what GPUs and TPUs do anyway, and a conditional there would cost a device-host round trip,
  so only CPU gets the barrier.
  """
  if not platform.on_cpu():
    return x
  return _grad_fusion_barrier(x)


class Block(nnx.Module):
  """Transformer block: norm1, attn, norm2, mlp (timm names), pre- or post-LayerNorm."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, ln_eps: float,
               dtype: Any = jnp.float32, attention: str = "xla", norm_position: str = "pre",
               activation: str = "gelu", causal: bool = False, temporal_frames: int = 0,
               rngs: nnx.Rngs):
    """Creates the block.

    Args:
      width: model width D.
      num_heads: attention heads; must divide `width`.
      mlp_dim: hidden width of the MLP.
      ln_eps: LayerNorm epsilon.
      dtype: compute dtype of the matmuls; the residual stream is in activation_dtype(dtype).
      attention: the attention implementation, one of `platform.ATTENTION_KERNELS`.
      norm_position: 'pre' (each sub-layer reads a normalised stream) or 'post' (the sum of
        the stream and the sub-layer's output is normalised: BERT, DistilBERT).
      activation: the MLP's, a key of `ACTIVATIONS`.
      causal: each token attends to itself and the tokens before it (CLIP's text).
      temporal_frames: F > 0: divided space-time attention over [CLS, F frames of patches]
        (pre-LN only).
      rngs: parameter initialisation.
    """
    if norm_position not in NORM_POSITIONS:
      raise ValueError(f"norm_position={norm_position!r}; must be one of {NORM_POSITIONS}")
    if temporal_frames and (norm_position != "pre" or causal):
      raise ValueError("divided space-time attention is a pre-LN, non-causal block")
    self.dtype = platform.activation_dtype(dtype)
    self.norm_position = norm_position
    self.causal = causal
    self.temporal_frames = temporal_frames
    if temporal_frames:
      self.time_norm = layer_norm(width, ln_eps, dtype, rngs)
      self.time_attn = Attention(width, num_heads, dtype=dtype, attention=attention,
                                 zero_init=True, rngs=rngs)
    self.norm1 = layer_norm(width, ln_eps, dtype, rngs)
    self.attn = Attention(width, num_heads, dtype=dtype, attention=attention, rngs=rngs)
    self.norm2 = layer_norm(width, ln_eps, dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, activation=activation, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               num_queries: int | None = None,
               query_index: jax.Array | None = None) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, S, D] tokens (cast to the activation dtype).
      mask: optional bool [B, S] key-padding mask (see `Attention`).
      num_queries: compute the output of the first `num_queries` tokens only (all by
        default); the others still serve as keys and values.
      query_index: int [B]: compute the output of this token of each row only. In a causal
        block the mask must then be the padding prefix that ends at it (its causal keys).

    Returns:
      [B, Q, D] in the activation dtype (Q: num_queries, 1 with query_index, else S).
    """
    x = grad_fusion_barrier(x.astype(self.dtype))
    if self.temporal_frames:
      if num_queries is not None or query_index is not None or mask is not None:
        raise ValueError("divided space-time attention reads every token, unmasked")
      frames = self.temporal_frames
      t = x + self.time_attn(self.time_norm(x), groups=("time", frames))
      x = x + self.attn(self.norm1(t), groups=("space", frames))
      return x + self.mlp(self.norm2(x))
    if query_index is not None:
      residual = jnp.take_along_axis(x, query_index[:, None, None], axis=1)
    else:
      residual = x if num_queries is None else x[:, :num_queries]
    causal = self.causal and num_queries is None and query_index is None
    attend = lambda h: self.attn(h, mask, num_queries, query_index=query_index, causal=causal)
    if self.norm_position == "post":
      x = self.norm1(residual + attend(x))
      return self.norm2(x + self.mlp(x))
    x = residual + attend(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class BlockStack(nnx.Module):
  """`depth` Blocks applied in sequence, as a list or scanned, with optional remat.

  Parameter layout (under the attribute `layers`):
    scan_layers=False: `layers/<i>/<block params>`, one subtree per block.
    scan_layers=True:  `layers/<block params>`, every leaf with a leading [depth] axis.
  """

  def __init__(self, depth: int, width: int, num_heads: int, mlp_dim: int, *,
               ln_eps: float, dtype: Any = jnp.float32, scan_layers: bool = False,
               remat: str = "none", attention: str = "xla", rngs: nnx.Rngs,
               **block_options: Any):
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
      attention: the attention implementation, one of `platform.ATTENTION_KERNELS`.
      rngs: parameter initialisation.
      **block_options: the other options of every `Block` (`norm_position`, `activation`,
        `causal`, `temporal_frames`).
    """
    if depth < 1:
      raise ValueError(f"depth must be >= 1, got {depth}")
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; must be one of {tuple(REMAT_POLICIES)}")
    self.depth = depth
    self.scan_layers = scan_layers
    self.remat = remat
    self.attention = attention
    self.divided = bool(block_options.get("temporal_frames"))  # see __call__

    def make_block(rngs):
      return Block(width, num_heads, mlp_dim, ln_eps=ln_eps, dtype=dtype, attention=attention,
                   rngs=rngs, **block_options)

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
               num_queries: int | None = None,
               query_index: jax.Array | None = None) -> jax.Array:
    """Applies the blocks in order.

    Args:
      x: [B, S, D] tokens.
      mask: optional bool [B, S] key-padding mask, shared by all blocks.
      num_queries: the caller reads only the first `num_queries` output tokens, so the last
        block computes only those (keys and values still come from every token): most of
        its work when a stack is read out at a few positions (text tower, sorter).
      query_index: int [B]: the caller reads only this token of each row (CLIP's end of
        text): the last block computes only it.

    Returns:
      [B, Q, D] in the compute dtype (Q: num_queries, 1 with query_index, else S).
    """
    s = x.shape[1]
    if self.attention != "cudnn" or s % 2 == 0 or self.divided:
      return self._apply(x, mask, num_queries, query_index)
    # cuDNN's attention takes only even lengths under differentiation. One zero token, a key
    # masked out in every block, makes the whole stack's sequence even: one pad and one slice
    # instead of padding q, k and v and slicing the output in every block (docs/performance.md).
    # The extra row's outputs are dropped; the rest is exactly what the odd-length stack
    # computes. (Divided attention regroups the tokens by frame: its calls pad themselves.)
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    mask = jnp.ones((x.shape[0], s), bool) if mask is None else mask
    mask = jnp.pad(mask, ((0, 0), (0, 1)))  # the new key: False
    out = self._apply(x, mask, num_queries, query_index)
    return out if num_queries is not None or query_index is not None else out[:, :s]

  def _apply(self, x: jax.Array, mask: jax.Array | None, num_queries: int | None,
             query_index: jax.Array | None) -> jax.Array:
    read_out = num_queries is not None or query_index is not None
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)

      def body(h, block_state):
        return nnx.merge(graphdef, block_state)(h, mask), None

      # The carry must keep one dtype across iterations.
      x = x.astype(self.layers.dtype)
      if not read_out:
        x, _ = jax.lax.scan(self._remat(body, in_scan=True), x, state)
        return x
      if self.depth > 1:
        x, _ = jax.lax.scan(self._remat(body, in_scan=True), x,
                            jax.tree.map(lambda a: a[:-1], state))
      last = jax.tree.map(lambda a: a[-1], state)
      return self._remat(lambda s, h, m, i: nnx.merge(graphdef, s)(h, m, num_queries, i))(
          last, x, mask, query_index)

    for n, block in enumerate(self.layers):
      last = n == self.depth - 1
      queries, index = (num_queries, query_index) if last else (None, None)
      if self.remat == "none":
        x = block(x, mask, queries, index)
      else:
        graphdef, state = nnx.split(block)
        x = self._remat(lambda s, h, m, i, g=graphdef, q=queries: nnx.merge(g, s)(h, m, q, i))(
            state, x, mask, index)
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
