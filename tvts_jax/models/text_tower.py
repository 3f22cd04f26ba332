"""The transcript encoder: token + position embeddings, pre-LN blocks, final LayerNorm.

The reference uses DistilBERT; ours has the same role (one feature per transcript, taken at the
first token, which the tokenizer makes a BOS) with the shared pre-LN block. Each of the K
transcripts of an example is encoded on its own: the tower runs on [B * K, L].

Parameters (Dt = model.text.width, V = model.text.vocab_size, L = data.text_len):
    token_embed/embedding  [V, Dt]
    pos_embed              [1, L, Dt]
    blocks/layers/...      see layers.BlockStack
    norm/scale, norm/bias  [Dt]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tvts_jax.models import layers, platform


class TextTower(nnx.Module):
  """Encodes K transcripts per example into K features."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Creates the tower from `config.model.text` and `config.data.text_len`.

    Args:
      config: a validated config.
      rngs: parameter initialisation.
    """
    t = config.model.text
    self.dtype = platform.activation_dtype(config.compute_dtype)
    self.width = t.width
    self.vocab_size = t.vocab_size
    self.max_len = config.data.text_len
    normal = jax.nn.initializers.normal(0.02)
    self.token_embed = nnx.Embed(t.vocab_size, t.width, dtype=self.dtype,
                                 param_dtype=jnp.float32, embedding_init=normal, rngs=rngs)
    self.pos_embed = nnx.Param(normal(rngs.params(), (1, self.max_len, t.width), jnp.float32))
    self.blocks = layers.BlockStack(
        t.depth, t.width, t.num_heads, t.mlp_dim, ln_eps=t.ln_eps, dtype=config.compute_dtype,
        scan_layers=config.model.scan_layers, remat=config.model.remat,
        attention=platform.resolve_attention(config), rngs=rngs)
    self.norm = layers.layer_norm(t.width, t.ln_eps, jnp.float32, rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Encodes transcripts.

    Args:
      ids: int32 [B, K, L] token ids, L <= data.text_len, the first token of each a BOS.
      mask: bool [B, K, L], True on real tokens; padded keys are never attended to.

    Returns:
      float32 [B, K, Dt]: the final-LayerNorm output at the first position of each transcript.
    """
    if ids.ndim != 3 or mask.shape != ids.shape:
      raise ValueError(f"text ids and mask must both be [B, K, L]; got {ids.shape} and "
                       f"{mask.shape}")
    b, k, length = ids.shape
    if length > self.max_len:
      raise ValueError(f"text length {length} exceeds data.text_len={self.max_len}")
    ids = ids.reshape(b * k, length)
    mask = mask.reshape(b * k, length).astype(bool)
    x = self.token_embed(ids) + self.pos_embed[...][:, :length].astype(self.dtype)
    # Only the first token is read out: the last block computes its row alone, and the final
    # LayerNorm runs on it alone.
    x = self.blocks(x, mask, num_queries=1)
    return self.norm(x[:, 0]).reshape(b, k, self.width)
