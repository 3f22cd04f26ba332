"""The video encoder: a ViT over 3-D tubelets, with joint or divided space-time attention.

One clip of T frames of HxW becomes `num_tubes = T / tubelet` temporal slices of
`num_patches = (H / patch)^2` tubelets each (`tubelet=1`: one slice per frame, a per-frame 2-D
patch embedding). Token order: CLS, then slice 0's patches in raster order, then slice 1's, and
so on. During pre-training each sample keeps a random `num_kept_per_slice(config)` of the
patches of each slice after the position embeddings are added: independently per slice
(`mask='per_slice'`, TVTS) or the same spatial positions in every slice (`mask='tube'`,
TVTSv2), so the encoder sees 1 + num_tubes * num_kept tokens.

The options of `model.video` make both recipes of one module:

    option              TVTS (v1)       TVTSv2
    tubelet             2               1 (each frame embedded alone, `patch_bias=False`)
    attention_layout    joint           divided (layers.Block: temporal then spatial)
    mask                per_slice       tube
    ln_pre              False           True (a LayerNorm on the tokens entering the blocks)
    activation          gelu            quick_gelu
    proj_dim            0               512 (every output token projected, after `norm`)

Parameters (D = model.video.width, t = tubelet, p = patch_size, N = num_patches):
    patch_embed/kernel    [t, p, p, 3, D]   a VALID, stride-(t, p, p) 3-D convolution kernel,
                                            (time, height, width, rgb, out); an MAE / timm /
                                            CLIP 2-D kernel `w` [D, 3, p, p] maps onto each
                                            time step as `w.transpose(2, 3, 1, 0)` (copied,
                                            not divided).
    patch_embed/bias      [D]               (patch_bias)
    cls_token             [1, 1, D]
    pos_embed             [1, N + 1, D]     spatial, slot 0 is CLS (timm's pos_embed layout)
    temporal_embed        [1, num_tubes, D] zero-init, or normal(model.video.temporal_init_std)
    ln_pre/scale, bias    [D]               (ln_pre)
    blocks/layers/...     see layers.BlockStack (divided: + time_norm, time_attn per block)
    norm/scale, norm/bias [D]               final LayerNorm, on every token
    proj/kernel           [D, proj_dim]     (proj_dim > 0), on every token, no bias
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tvts_jax import config_schema
from tvts_jax.models import layers, matmul, platform

# ImageNet statistics on the 0..255 scale: the data pipeline ships uint8 frames and the
# normalisation runs on the device (converting to float on the host was most of the input
# pipeline's time: docs/performance.md).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


def normalize_video(video: jax.Array) -> jax.Array:
  """uint8 (or float in [0, 255]) RGB frames -> ImageNet-normalised float32, same shape.

  The model never calls this: `TubeletEmbed` folds the same normalisation into its kernel. It
  is the definition that folding must equal (tests), and a helper for other encoders' inputs.
  """
  return (video.astype(jnp.float32) - IMAGENET_MEAN) / IMAGENET_STD


def sample_kept_indices(rng: jax.Array, batch_size: int, num_tubes: int, num_patches: int,
                        num_kept: int, tube: bool = False) -> jax.Array:
  """Draws which patches each sample keeps in each temporal slice.

  Args:
    rng: a PRNG key.
    batch_size: B.
    num_tubes: temporal slices per clip.
    num_patches: patches per slice.
    num_kept: patches kept per slice.
    tube: keep the same positions in every slice (a tube mask) instead of drawing each slice's.

  Returns:
    int32 [B, num_tubes, num_kept]: distinct patch indices per (sample, slice), ascending so
    that kept tokens stay in raster order.
  """
  noise = jax.random.uniform(rng, (batch_size, 1 if tube else num_tubes, num_patches))
  # top_k of i.i.d. uniform noise is a uniform random subset; cheaper than a full argsort.
  _, idx = jax.lax.top_k(noise, num_kept)
  idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
  return jnp.broadcast_to(idx, (batch_size, num_tubes, num_kept))


class TubeletEmbed(nnx.Module):
  """Non-overlapping t x p x p tubelets -> D features (a strided VALID 3-D convolution).

  Computed as patch extraction + one matmul, which is the same arithmetic as the convolution
  but lowers to a plain dot on every backend. The input is on the 0..255 scale: the ImageNet
  normalisation is folded into the kernel and bias (`(x - m) / s @ W + b == x @ (W / s) +
  (b - (m / s) @ W)`, exact algebra), so no normalised copy of the frames is ever written and
  uint8 pixels enter the matmul directly (exactly representable in bfloat16 too).
  """

  def __init__(self, tubelet: int, patch_size: int, width: int, *, dtype, rngs: nnx.Rngs,
               bias: bool = True):
    self.tubelet = tubelet
    self.patch_size = patch_size
    self.dtype = jnp.dtype(dtype)
    # MAE initialises the patch projection as xavier_uniform over the flattened kernel.
    init = jax.nn.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4)
    self.kernel = nnx.Param(init(rngs.params(), (tubelet, patch_size, patch_size, 3, width),
                                 jnp.float32))
    # CLIP's per-frame embedding has no bias (patch_bias=False): the folded normalisation
    # still needs one, computed from the kernel alone.
    self.bias = nnx.Param(jnp.zeros((width,), jnp.float32)) if bias else None

  def patchify(self, video: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] -> [B, T / t, (H / p) * (W / p), t * p * p * 3], same dtype.

    Patches in raster order, each flattened in the kernel's (t, p, p, rgb) order. A pure
    relayout: on uint8 frames it moves a quarter of the bytes a float copy would.
    """
    b, t, h, w, c = video.shape
    tt, p = self.tubelet, self.patch_size
    x = video.reshape(b, t // tt, tt, h // p, p, w // p, p, c)
    # -> [B, tubes, h/p, w/p, tt, p, p, c]: the patch vector in the kernel's (t, p, p, 3) order.
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, t // tt, (h // p) * (w // p), tt * p * p * c)

  def embed_patches(self, patches: jax.Array) -> jax.Array:
    """Patch vectors from `patchify` (0..255 scale, any leading shape) -> [..., D]."""
    kernel = self.kernel[...]
    kernel = kernel.reshape(-1, kernel.shape[-1])  # [t*p*p*3, D], rows in (t, p, p, c) order
    reps = kernel.shape[0] // 3
    inv_std = jnp.asarray(np.tile(1.0 / IMAGENET_STD, reps))
    shift = jnp.asarray(np.tile(IMAGENET_MEAN / IMAGENET_STD, reps))
    bias = -jnp.dot(shift, kernel, precision=jax.lax.Precision.HIGHEST)
    if self.bias is not None:
      bias = self.bias[...] + bias
    kernel = kernel * inv_std[:, None]
    return matmul.dense(patches, kernel, bias, self.dtype)

  def __call__(self, video: jax.Array) -> jax.Array:
    """Embeds every tubelet.

    Args:
      video: [B, T, H, W, 3] frames on the 0..255 scale (uint8 or float), NOT normalised.

    Returns:
      [B, T / t, (H / p) * (W / p), D] in `platform.activation_dtype(dtype)`, patches in
      raster order: the convolution of `normalize_video(video)` with the kernel, plus the bias.
    """
    return self.embed_patches(self.patchify(video))


class VideoViT(nnx.Module):
  """The video tower: tubelets + CLS + position embeddings + token keeping + blocks + LN.

  Attributes:
    out_width: the width of its output tokens (model.video.proj_dim, else width).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Creates the tower from `config.model.video`, `config.data` and `config.model`.

    Args:
      config: a validated config (see `config_schema`).
      rngs: parameter initialisation.
    """
    v, d = config.model.video, config.data
    self.dtype = platform.activation_dtype(config.compute_dtype)
    self.width = v.width
    self.num_frames = d.num_frames
    self.image_size = d.image_size
    self.num_tubes = d.num_frames // v.tubelet
    self.num_patches = config_schema.num_tokens_per_slice(config)
    self.num_kept = config_schema.num_kept_per_slice(config)
    self.tube_mask = v.mask == "tube"
    self.out_width = v.proj_dim or v.width

    self.patch_embed = TubeletEmbed(v.tubelet, v.patch_size, v.width, dtype=config.compute_dtype,
                                    bias=v.patch_bias, rngs=rngs)
    normal = jax.nn.initializers.normal(0.02)
    self.cls_token = nnx.Param(normal(rngs.params(), (1, 1, v.width), jnp.float32))
    self.pos_embed = nnx.Param(
        normal(rngs.params(), (1, self.num_patches + 1, v.width), jnp.float32))
    temporal_shape = (1, self.num_tubes, v.width)
    self.temporal_embed = nnx.Param(
        jax.nn.initializers.normal(v.temporal_init_std)(rngs.params(), temporal_shape,
                                                        jnp.float32)
        if v.temporal_init == "normal"
        else jnp.zeros(temporal_shape, jnp.float32))
    self.ln_pre = (layers.layer_norm(v.width, v.ln_eps, config.compute_dtype, rngs)
                   if v.ln_pre else None)
    self.blocks = layers.BlockStack(
        v.depth, v.width, v.num_heads, v.mlp_dim, ln_eps=v.ln_eps, dtype=config.compute_dtype,
        scan_layers=config.model.scan_layers, remat=config.model.remat,
        attention=platform.resolve_attention(config), activation=v.activation,
        temporal_frames=self.num_tubes if v.attention_layout == "divided" else 0, rngs=rngs)
    self.norm = layers.layer_norm(v.width, v.ln_eps, jnp.float32, rngs)
    self.proj = (layers.Linear(v.width, v.proj_dim, use_bias=False, dtype=config.compute_dtype,
                               param_dtype=jnp.float32,
                               kernel_init=jax.nn.initializers.normal(v.width ** -0.5),
                               rngs=rngs)
                 if v.proj_dim else None)

  def num_tokens(self, keep: bool) -> int:
    """Encoder sequence length with (keep=True) or without token keeping."""
    return 1 + self.num_tubes * (self.num_kept if keep else self.num_patches)

  def _check_video(self, video: jax.Array):
    expected = (self.num_frames, self.image_size, self.image_size, 3)
    if video.ndim != 5 or tuple(video.shape[1:]) != expected:
      raise ValueError(f"video must be [B, {', '.join(map(str, expected))}] "
                       f"(data.num_frames, data.image_size x2, RGB), got {video.shape}")

  def embed(self, video: jax.Array, keep_rng: jax.Array | None = None) -> jax.Array:
    """Tokens entering the first block: CLS and the (kept) patches with position embeddings.

    Args:
      video: uint8 [B, T, H, W, 3] (or float in [0, 255]).
      keep_rng: PRNG key for token keeping; None keeps every patch (evaluation).

    Returns:
      [B, 1 + num_tubes * kept, D] in the activation dtype (`platform.activation_dtype`).
    """
    self._check_video(video)
    b = video.shape[0]
    patches = self.patch_embed.patchify(video)  # [B, tubes, N, t*p*p*3], input dtype
    pos_embed = self.pos_embed[...]  # [1, 1 + N, D], slot 0: CLS
    pos = pos_embed[0, 1:]  # [N, D]
    if keep_rng is None:
      pos = jnp.broadcast_to(pos, (b, self.num_tubes) + pos.shape)
    else:
      # Keep before embedding: the embedding is per tubelet and the position embedding is
      # per slot, so gathering the kept raw patches (uint8) first and their position
      # embeddings with them gives the same tokens as embed-all-then-drop, for a quarter of
      # the patch matmul (forward and weight gradient) and of the patch relayout.
      idx = sample_kept_indices(keep_rng, b, self.num_tubes, self.num_patches, self.num_kept,
                                tube=self.tube_mask)
      patches = jnp.take_along_axis(patches, idx[..., None], axis=2)
      pos = jnp.take(pos, idx, axis=0)  # [B, tubes, kept, D]
    x = (self.patch_embed.embed_patches(patches) + pos.astype(self.dtype)
         + self.temporal_embed[...][:, :, None].astype(self.dtype))
    x = x.reshape(b, -1, self.width)
    cls = (self.cls_token[...] + pos_embed[:, :1]).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
    return x if self.ln_pre is None else self.ln_pre(x)

  def __call__(self, video: jax.Array, keep_rng: jax.Array | None = None) -> jax.Array:
    """Encodes a batch of clips.

    Args:
      video: uint8 [B, T, H, W, 3] (or float in [0, 255]).
      keep_rng: PRNG key for token keeping; None keeps every patch (evaluation).

    Returns:
      float32 [B, 1 + num_tubes * kept, out_width]: every token after the final LayerNorm
      (and the projection, with proj_dim), CLS first.
    """
    x = self.norm(self.blocks(self.embed(video, keep_rng)))
    if self.proj is not None:
      x = self.proj(x).astype(jnp.float32)
    return x
