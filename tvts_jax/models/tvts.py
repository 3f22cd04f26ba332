"""TVTS: the video tower, the text tower, the sorter and the contrastive projections.

Build with `TVTS(config, rngs=nnx.Rngs(seed))` (or `build_model(config, seed)`); the forward
pass is pure: its only randomness is the explicit `keep_rng` (token keeping), there is no
dropout and no rng stream is read at call time.

    out = model(video, text_ids, text_mask, keep_rng=rng)   # pre-training
    out = model(video, text_ids, text_mask)                 # evaluation: all tokens kept
    model.video_features(video)                             # [B, D] CLS, for probes/retrieval

Parameter tree (`nnx.state(model, nnx.Param).to_pure_dict()`), names stable for the converters
and the exporter. D = model.video.width, Dt = model.text.width, E = model.embed_dim,
K = data.num_clips, t/p = tubelet/patch_size, N = (image_size / p)^2, S = num_frames / t,
V = model.text.vocab_size, L = data.text_len. Every Linear is `kernel` [in, out] + `bias` [out];
every LayerNorm is `scale` + `bias`.

    video/patch_embed/kernel [t, p, p, 3, D], bias [D]
    video/cls_token [1, 1, D]
    video/pos_embed [1, N + 1, D]            (slot 0: CLS)
    video/temporal_embed [1, S, D]
    video/blocks/layers/<i>/norm1            [D]
    video/blocks/layers/<i>/attn/qkv         [D, 3D]  (columns: q|k|v, head, head_dim)
    video/blocks/layers/<i>/attn/proj        [D, D]
    video/blocks/layers/<i>/norm2            [D]
    video/blocks/layers/<i>/mlp/fc1          [D, mlp_dim]
    video/blocks/layers/<i>/mlp/fc2          [mlp_dim, D]
    video/norm                               [D]
    text/token_embed/embedding [V, Dt]
    text/pos_embed [1, L, Dt]                (L: model.text.max_positions, or data.text_len)
    text/blocks/layers/<i>/...               as above, width Dt
    text/norm                                [Dt]
    sorter/text_proj                         [Dt, D]  (only when Dt != D)
    sorter/type_embed [2, D]
    sorter/blocks/layers/<i>/...             as above, width D, model.sorter.mlp_dim
    sorter/norm                              [D]
    sorter/head                              [D, K]
    video_proj                               [D, E]   (contrastive_head='projections')
    text_proj                                [Dt, E]  (contrastive_head='projections')

That is TVTS (v1). The towers' options add to it (video_vit.py, text_tower.py: e.g. `video/ln_pre`,
`video/proj` [D, Pv], `video/blocks/layers/<i>/{time_norm,time_attn}` with divided attention,
`text/embed_norm`, `text/proj` [Dt, Pt]); D and Dt above are then the towers' output widths
where the sorter and the heads read them (`config_schema.output_widths`).

With `model.scan_layers=True` each `blocks/layers/<i>/...` becomes `blocks/layers/...` with a
leading [depth] axis; `layers.to_list_layout` / `layers.to_scanned_layout` convert between the
two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tvts_jax import config_schema
from tvts_jax.models import layers, platform
from tvts_jax.models.sorter import Sorter
from tvts_jax.models.text_tower import TextTower
from tvts_jax.models.video_vit import VideoViT


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| along the last axis, in float32; a zero vector stays zero (no NaN)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class TVTS(nnx.Module):
  """The whole pre-training model; returns everything the losses need."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Creates the model.

    Args:
      config: a config following `config_schema`; validated here, so an impossible shape is a
        ConfigError before any parameter is allocated.
      rngs: parameter initialisation (only `rngs.params` is used).

    Raises:
      config_schema.ConfigError: the config cannot build a model.
    """
    config_schema.validate(config)
    for name, group in (("video", config.model.video), ("text", config.model.text),
                        ("sorter", config.model.sorter)):
      for key in ("depth", "num_heads", "mlp_dim"):
        if group[key] < 1:
          raise config_schema.ConfigError(f"model.{name}.{key} must be >= 1, got "
                                          f"{group[key]}")
    if config.model.embed_dim < 1:
      raise config_schema.ConfigError(f"model.embed_dim must be >= 1, got "
                                      f"{config.model.embed_dim}")
    platform.check_attention_backend(config.model.attention)
    self.num_clips = config.data.num_clips
    self.sort_trains_text = bool(config.sort_trains_text)
    self.video = VideoViT(config, rngs=rngs)
    self.text = TextTower(config, rngs=rngs)
    self.sorter = Sorter(config, rngs=rngs)
    # The projections and everything after them run in float32: they are small, and the
    # contrastive logits are divided by a temperature of 0.05.
    if config.model.contrastive_head == "projections":
      video_width, text_width = config_schema.output_widths(config)
      self.video_proj = layers.linear(video_width, config.model.embed_dim, jnp.float32, rngs)
      self.text_proj = layers.linear(text_width, config.model.embed_dim, jnp.float32, rngs)
    else:  # 'identity': the towers' own projected outputs (TVTSv2)
      self.video_proj = self.text_proj = None

  def encode_video(self, video: jax.Array, keep_rng: jax.Array | None = None) -> jax.Array:
    """All video tokens after the final LayerNorm.

    Args:
      video: uint8 [B, T, H, W, 3] (or float in [0, 255]).
      keep_rng: PRNG key for token keeping; None keeps every token.

    Returns:
      float32 [B, 1 + S * kept, D], CLS first.
    """
    return self.video(video, keep_rng)

  def video_features(self, video: jax.Array) -> jax.Array:
    """The evaluation / export feature: the CLS token with every patch kept.

    Args:
      video: uint8 [B, T, H, W, 3] (or float in [0, 255]).

    Returns:
      float32 [B, D].
    """
    return self.video(video)[:, 0]

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    """Transcript features: float32 [B, K, Dt] from ids/mask [B, K, L]."""
    return self.text(text_ids, text_mask)

  def video_embedding(self, video_cls: jax.Array) -> jax.Array:
    """The contrastive embedding of videos from their CLS tokens [B, D]: L2-normalised [B, E]
    (`model.contrastive_head`: a Linear, or the CLS itself)."""
    if self.video_proj is None:
      return l2_normalize(video_cls)
    return l2_normalize(self.video_proj(video_cls))

  def text_embedding(self, text_features: jax.Array) -> jax.Array:
    """The contrastive embedding of texts from their K features [B, K, Dt]: the mean of the K
    projections (ReLU + Linear; or the features themselves), L2-normalised [B, E]. K may be 1:
    one caption, one query."""
    if self.text_proj is None:
      return l2_normalize(jnp.mean(text_features, axis=1))
    return l2_normalize(jnp.mean(self.text_proj(jax.nn.relu(text_features)), axis=1))

  def __call__(self, video: jax.Array, text_ids: jax.Array, text_mask: jax.Array, *,
               keep_rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Runs both towers, the sorter and the projections.

    Args:
      video: uint8 [B, T, H, W, 3] (or float in [0, 255]).
      text_ids: int32 [B, K, L], the K transcripts in the (shuffled) order the sorter sees.
      text_mask: bool [B, K, L], True on real tokens.
      keep_rng: PRNG key for token keeping; None keeps every token (evaluation).

    Returns:
      A dict of float32 arrays:
        video_tokens [B, N, D]: video encoder output (CLS first).
        video_cls [B, D]: its CLS token.
        video_emb [B, E]: L2-normalised video projection.
        text_features [B, K, Dt]: per-transcript features.
        text_emb [B, E]: L2-normalised mean of the K transcript projections.
        sort_logits [B, K, K]: [b, k, j] scores transcript k against clip j. The sorter sees
          stop-gradient'ed text features (the sort loss trains the video tower and sorter
          only) unless `config.sort_trains_text`.
    """
    b = video.shape[0]
    if text_ids.shape[:2] != (b, self.num_clips):
      raise ValueError(f"text_ids must be [B={b}, K={self.num_clips} (data.num_clips), L]; "
                       f"got {text_ids.shape}")
    video_tokens = self.video(video, keep_rng)
    video_cls = video_tokens[:, 0]
    text_features = self.text(text_ids, text_mask)
    sort_logits = self.sorter(video_tokens, text_features if self.sort_trains_text
                              else jax.lax.stop_gradient(text_features))
    return dict(
        video_tokens=video_tokens,
        video_cls=video_cls,
        video_emb=self.video_embedding(video_cls),
        text_features=text_features,
        text_emb=self.text_embedding(text_features),
        sort_logits=sort_logits,
    )


def build_model(config: ml_collections.ConfigDict, seed: int | jax.Array = 0) -> TVTS:
  """`TVTS(config, rngs=nnx.Rngs(seed))`; `seed` may be an int or a (traced) PRNG key."""
  return TVTS(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ml_collections.ConfigDict):
  """(graphdef, abstract parameters as an `nnx.State`) of `config`'s model, allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: build_model(config)))


def init_params(config: ml_collections.ConfigDict, rng: int | jax.Array) -> dict:
  """Freshly initialised parameters as the train state holds them: a pure nested dict."""
  return nnx.split(build_model(config, rng))[1].to_pure_dict()


def dummy_inputs(config: ml_collections.ConfigDict, batch_size: int):
  """Zero inputs of the right shapes and dtypes: (video, text_ids, text_mask).

  For shape inference, compilation warm-up and benchmarks; every transcript has one real
  token (its BOS) so that no attention row is fully masked.
  """
  d = config.data
  video = jnp.zeros((batch_size, d.num_frames, d.image_size, d.image_size, 3), jnp.uint8)
  ids = jnp.zeros((batch_size, d.num_clips, d.text_len), jnp.int32)
  mask = jnp.zeros((batch_size, d.num_clips, d.text_len), bool).at[..., 0].set(True)
  return video, ids, mask
