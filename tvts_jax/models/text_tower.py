"""The transcript encoder: token + position embeddings, the shared blocks, one feature per text.

Each of the K transcripts of an example is encoded on its own (the tower runs on [B * K, L])
into one feature, read at one position. `model.text.arch` chooses the arithmetic, all on the one
shared `layers.Block`:

    arch         blocks                      embedding LN   final LN   feature read at
    tvts         pre-LN, GELU                no             yes        the first token (BOS)
    distilbert   post-LN, GELU               yes            no         the first token ([CLS])
    clip         pre-LN, QuickGELU, causal   no             yes        the last real token (the
                                                                       end of text)

`distilbert` is DistilBERT's arithmetic exactly (word + learned position embeddings, LayerNorm,
post-LN blocks with exact GELU, padding masked), so `init_from=distilbert:PATH` gives the
pretrained tower (tvts_jax/convert/distilbert.py); `clip` is CLIP's text transformer
(`init_from=clip:PATH`, tvts_jax/convert/clip.py), its feature then projected by
`model.text.proj_dim` (`text_projection`). The tokenizer puts the read-out token where the
arch reads it (data_pipelines/tokenizer.py): first, or last with truncation keeping it.

Parameters (Dt = model.text.width, V = model.text.vocab_size, P = model.text.max_positions, or
data.text_len when that is 0):
    token_embed/embedding  [V, Dt]
    pos_embed              [1, P, Dt]
    embed_norm/scale, bias [Dt]        (distilbert)
    blocks/layers/...      see layers.BlockStack
    norm/scale, norm/bias  [Dt]        (tvts, clip)
    proj/kernel            [Dt, Pt]    (model.text.proj_dim = Pt > 0), no bias
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tvts_jax.models import layers, platform


@dataclasses.dataclass(frozen=True)
class TextArch:
  """What a text architecture is made of (see the module docstring)."""
  norm_position: str  # of the blocks: 'pre' or 'post'
  embed_norm: bool  # a LayerNorm on the embeddings
  final_norm: bool  # a LayerNorm on the read-out feature
  read_last: bool = False  # read at the last real token (else the first)
  causal: bool = False
  activation: str = "gelu"


# `model.text.arch` -> its parts.
ARCHS = {
    "tvts": TextArch(norm_position="pre", embed_norm=False, final_norm=True),
    "distilbert": TextArch(norm_position="post", embed_norm=True, final_norm=False),
    "clip": TextArch(norm_position="pre", embed_norm=False, final_norm=True, read_last=True,
                     causal=True, activation="quick_gelu"),
}


def num_positions(config: ml_collections.ConfigDict) -> int:
  """Rows of the position table: `model.text.max_positions`, or `data.text_len` when 0."""
  return int(config.model.text.max_positions or config.data.text_len)


class TextTower(nnx.Module):
  """Encodes K transcripts per example into K features."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Creates the tower from `config.model.text` and `config.data.text_len`.

    Args:
      config: a validated config.
      rngs: parameter initialisation.
    """
    t = config.model.text
    arch = ARCHS[t.arch]
    self.dtype = platform.activation_dtype(config.compute_dtype)
    self.read_last = arch.read_last
    self.width = t.proj_dim or t.width  # of the features it returns
    self.vocab_size = t.vocab_size
    self.max_len = num_positions(config)
    normal = jax.nn.initializers.normal(0.02)
    self.token_embed = nnx.Embed(t.vocab_size, t.width, dtype=self.dtype,
                                 param_dtype=jnp.float32, embedding_init=normal, rngs=rngs)
    self.pos_embed = nnx.Param(normal(rngs.params(), (1, self.max_len, t.width), jnp.float32))
    self.embed_norm = (layers.layer_norm(t.width, t.ln_eps, config.compute_dtype, rngs)
                       if arch.embed_norm else None)
    self.blocks = layers.BlockStack(
        t.depth, t.width, t.num_heads, t.mlp_dim, ln_eps=t.ln_eps, dtype=config.compute_dtype,
        scan_layers=config.model.scan_layers, remat=config.model.remat,
        attention=platform.resolve_attention(config), norm_position=arch.norm_position,
        causal=arch.causal, activation=arch.activation, rngs=rngs)
    self.norm = (layers.layer_norm(t.width, t.ln_eps, jnp.float32, rngs)
                 if arch.final_norm else None)
    self.proj = (layers.Linear(t.width, t.proj_dim, use_bias=False, dtype=jnp.float32,
                               param_dtype=jnp.float32,
                               kernel_init=jax.nn.initializers.normal(t.width ** -0.5),
                               rngs=rngs)
                 if t.proj_dim else None)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Encodes transcripts.

    Args:
      ids: int32 [B, K, L] token ids, L <= the position table, the first token of each a
        BOS / [CLS].
      mask: bool [B, K, L], True on real tokens; padded keys are never attended to.

    Returns:
      float32 [B, K, Dt] (Pt with proj_dim): the feature of each transcript, read at its
      first token, or at its last real one (`clip`).
    """
    if ids.ndim != 3 or mask.shape != ids.shape:
      raise ValueError(f"text ids and mask must both be [B, K, L]; got {ids.shape} and "
                       f"{mask.shape}")
    b, k, length = ids.shape
    if length > self.max_len:
      raise ValueError(f"text length {length} exceeds the position table of {self.max_len} "
                       "(model.text.max_positions, or data.text_len)")
    ids = ids.reshape(b * k, length)
    mask = mask.reshape(b * k, length).astype(bool)
    x = self.token_embed(ids) + self.pos_embed[...][:, :length].astype(self.dtype)
    if self.embed_norm is not None:
      x = self.embed_norm(x)
    # Only one token is read out: the last block computes its row alone (and the final
    # LayerNorm runs on it alone). Causal attention at the last real token sees exactly the
    # unpadded prefix, which is what the padding mask says.
    if self.read_last:
      last = jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
      x = self.blocks(x, mask, query_index=last)[:, 0]
    else:
      x = self.blocks(x, mask, num_queries=1)[:, 0]
    if self.norm is not None:
      x = self.norm(x)
    if self.proj is not None:
      x = self.proj(x.astype(jnp.float32))
    return x.astype(jnp.float32).reshape(b, k, self.width)
