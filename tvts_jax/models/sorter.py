"""The order head: which clip does each (shuffled) transcript belong to?

The sorter reads the K transcript features and every video output token (CLS included).
Transcripts get a type embedding but no position embedding, so the sorter is equivariant to
their order: permuting the transcripts permutes the rows of the output, and the order can only
be read off the video. (Nothing has a position embedding, so the order of the sequence is
free: the transcripts come first, which lets the last block compute only their K rows.)

Parameters (D = the video tower's output width, model.video.proj_dim or width; Dt = the text
tower's, model.text.proj_dim or width; K = data.num_clips):
    text_proj/kernel, bias  [Dt, D], [D]   only when Dt != D
    type_embed              [2, D]         zero-init; row 0 video, row 1 text
    blocks/layers/...       see layers.BlockStack (model.sorter depth/heads/mlp_dim, width D)
    norm/scale, norm/bias   [D]            LayerNorm on the K text positions
    head/kernel, head/bias  [D, K], [K]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tvts_jax import config_schema
from tvts_jax.models import layers, platform


class Sorter(nnx.Module):
  """Video tokens + K transcript features -> [K, K] transcript-to-clip logits."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Creates the head from `config.model.sorter`, the two tower widths and num_clips.

    Args:
      config: a validated config.
      rngs: parameter initialisation.
    """
    s = config.model.sorter
    width, text_width = config_schema.output_widths(config)
    self.dtype = platform.activation_dtype(config.compute_dtype)
    self.width = width
    self.num_clips = config.data.num_clips
    self.text_proj = (layers.linear(text_width, width, config.compute_dtype, rngs)
                      if text_width != width else None)
    self.type_embed = nnx.Param(jnp.zeros((2, width), jnp.float32))
    self.blocks = layers.BlockStack(
        s.depth, width, s.num_heads, s.mlp_dim, ln_eps=s.ln_eps, dtype=config.compute_dtype,
        scan_layers=config.model.scan_layers, remat=config.model.remat,
        attention=platform.resolve_attention(config), rngs=rngs)
    self.norm = layers.layer_norm(width, s.ln_eps, jnp.float32, rngs)
    self.head = layers.linear(width, self.num_clips, jnp.float32, rngs)

  def __call__(self, video_tokens: jax.Array, text_features: jax.Array) -> jax.Array:
    """Scores each transcript against each clip position.

    The caller decides what is trained: `TVTS` passes stop-gradient'ed text features.

    Args:
      video_tokens: [B, N, D] video encoder output (CLS first).
      text_features: [B, K, Dt] transcript features, in any order.

    Returns:
      float32 [B, K, K]; logits[b, k, j] scores "transcript k belongs to clip j".
    """
    b = video_tokens.shape[0]
    if text_features.shape[:2] != (b, self.num_clips):
      raise ValueError(f"text_features must be [B={b}, K={self.num_clips}, Dt]; got "
                       f"{text_features.shape}")
    text = text_features.astype(self.dtype)
    if self.text_proj is not None:
      text = self.text_proj(text)
    type_embed = self.type_embed[...].astype(self.dtype)
    # Text first: the sorter has no position embedding, so attention does not depend on the
    # token order, and with the K read-out tokens first the last block computes only them.
    x = jnp.concatenate([text + type_embed[1],
                         video_tokens.astype(self.dtype) + type_embed[0]], axis=1)
    x = self.blocks(x, num_queries=self.num_clips)
    return self.head(self.norm(x))
