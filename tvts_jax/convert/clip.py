"""A Hugging Face CLIP (`CLIPModel` layout) -> both towers of TVTSv2: `init_from='clip:PATH'`.

PATH is a model folder (`model.safetensors`, or `pytorch_model.bin` read weights-only; with its
`config.json`) or one weights file, e.g. `openai/clip-vit-base-patch16`. TVTSv2 starts both
towers from CLIP: the video tower as CLIP's ViT applied to every frame (`tubelet=1`, the 2-D
patch kernel; with `tubelet > 1` it is copied onto each time step), with the new temporal
attention of every block and the temporal embedding left at their init; the text tower as
CLIP's text transformer (`model.text.arch='clip'`). D = video width, Dt = text width:

    CLIP key                                        -> our parameter (transformation)
    vision_model.embeddings.patch_embedding.weight   -> video/patch_embed/kernel [t, p, p, 3, D]
      [D, 3, p, p] (no bias)                           (`w.transpose(2, 3, 1, 0)` per time step)
    vision_model.embeddings.class_embedding [D]      -> video/cls_token [1, 1, D]
    vision_model.embeddings.position_embedding       -> video/pos_embed [1, 1 + N, D] (the grid
      .weight [1 + N, D]                                resized bicubically when N differs)
    vision_model.pre_layrnorm                        -> video/ln_pre (model.video.ln_pre)
    vision_model.encoder.layers.i.{layer_norm1, self_attn.{q,k,v}_proj, self_attn.out_proj,
      layer_norm2, mlp.fc1, mlp.fc2}                 -> video/blocks/layers/i/{norm1, attn/qkv
                                                        (q|k|v side by side), attn/proj, norm2,
                                                        mlp/fc1, mlp/fc2}
    vision_model.post_layernorm                      -> video/norm
    visual_projection.weight [Pv, D]                 -> video/proj/kernel [D, Pv]
    text_model.embeddings.token_embedding.weight     -> text/token_embed/embedding
    text_model.embeddings.position_embedding.weight  -> text/pos_embed [1, P, Dt] (the first
                                                        model.text.max_positions rows)
    text_model.encoder.layers.i.*                    -> text/blocks/layers/i/* (as the vision
                                                        layers)
    text_model.final_layer_norm                      -> text/norm
    text_projection.weight [Pt, Dt]                  -> text/proj/kernel [Dt, Pt]

Reported and not converted: `logit_scale` (TVTSv2 does not use it) and the `position_ids`
buffers. The sorter and the temporal parts keep their initialisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tvts_jax import config_schema
from tvts_jax.convert import state_dict as sd_lib
from tvts_jax.models import text_tower

SKIPPED_PREFIXES = ("logit_scale", "text_model.embeddings.position_ids",
                    "vision_model.embeddings.position_ids")


# One Hugging Face CLIP encoder layer (pre-LN) in our Block's terms.
LAYER = sd_lib.separate_qkv_block(dict(
    norm1="layer_norm1", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
    out="self_attn.out_proj", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2"))


def require(config, sd: sd_lib.StateDict, what: str) -> None:
  """The options a CLIP start needs: they are errors naming the key, not silent mismatches."""
  v, t = config.model.video, config.model.text
  problems = []
  if not v.ln_pre:
    problems.append("model.video.ln_pre=True (CLIP's ln_pre)")
  if v.activation != "quick_gelu":
    problems.append("model.video.activation='quick_gelu'")
  if not v.proj_dim:
    problems.append("model.video.proj_dim (CLIP's projection width)")
  if t.arch != "clip" or not t.proj_dim:
    problems.append("model.text.arch='clip' with model.text.proj_dim")
  if problems:
    raise sd_lib.ConversionError(f"{sd.source}: a {what} start needs {'; '.join(problems)} "
                                 "(configs/tvts_v2_b16.py has them)")


def patch_kernel(w: np.ndarray, tubelet: int) -> np.ndarray:
  """A 2-D patch kernel [D, 3, p, p] -> ours [t, p, p, 3, D], copied onto each time step."""
  k = w.transpose(2, 3, 1, 0)[None]
  return np.broadcast_to(k, (tubelet,) + k.shape[1:]).copy()


def positions(sd: sd_lib.StateDict, key: str, ours: str, width: int, rows: int) -> np.ndarray:
  """A [P, width] position table -> [1, rows, width] (its first rows; at least `rows`)."""
  pos = sd.take(key, ours)
  if pos.ndim != 2 or pos.shape[1] != width or pos.shape[0] < rows:
    raise sd_lib.ConversionError(f"{sd.source}: {key} has shape {pos.shape}; this config needs "
                                 f"at least {rows} positions of width {width}")
  if pos.shape[0] > rows:
    sd.report.notes.append(f"{ours} cut {pos.shape[0]} -> {rows} rows")
  return pos[None, :rows]


def convert(sd: sd_lib.StateDict, config) -> dict[str, Any]:
  """A CLIPModel state dict -> `{'video': ..., 'text': ...}` (list layout)."""
  require(config, sd, "CLIP")
  v, t = config.model.video, config.model.text
  d, dt = v.width, t.width
  n = config_schema.num_tokens_per_slice(config)
  vis, txt = "vision_model.", "text_model."
  w = sd.take(f"{vis}embeddings.patch_embedding.weight", "video/patch_embed/kernel",
              (d, 3, v.patch_size, v.patch_size))
  pos = sd.take(f"{vis}embeddings.position_embedding.weight", "video/pos_embed")
  if pos.ndim != 2 or pos.shape[1] != d:
    raise sd_lib.ConversionError(f"{sd.source}: {vis}embeddings.position_embedding.weight has "
                                 f"shape {pos.shape}, expected [1 + grid, {d}]")
  pos = sd_lib.resize_pos_embed(pos[None], n)
  video = {
      "patch_embed": {"kernel": patch_kernel(w, v.tubelet)},
      "cls_token": sd.take(f"{vis}embeddings.class_embedding", "video/cls_token",
                           (d,)).reshape(1, 1, d),
      "pos_embed": pos,
      "ln_pre": sd_lib.layer_norm(sd, f"{vis}pre_layrnorm", "video/ln_pre", d),
      "blocks": sd_lib.blocks(sd, f"{vis}encoder.layers", "video/blocks", v.depth, d,
                              v.mlp_dim, LAYER),
      "norm": sd_lib.layer_norm(sd, f"{vis}post_layernorm", "video/norm", d),
      "proj": {"kernel": sd.take("visual_projection.weight", "video/proj/kernel",
                                 (v.proj_dim, d)).T},
  }
  text = {
      "token_embed": {"embedding": sd.take(f"{txt}embeddings.token_embedding.weight",
                                           "text/token_embed/embedding", (t.vocab_size, dt))},
      "pos_embed": positions(sd, f"{txt}embeddings.position_embedding.weight", "text/pos_embed",
                             dt, text_tower.num_positions(config)),
      "blocks": sd_lib.blocks(sd, f"{txt}encoder.layers", "text/blocks", t.depth, dt,
                              t.mlp_dim, LAYER),
      "norm": sd_lib.layer_norm(sd, f"{txt}final_layer_norm", "text/norm", dt),
      "proj": {"kernel": sd.take("text_projection.weight", "text/proj/kernel",
                                 (t.proj_dim, dt)).T},
  }
  for prefix in SKIPPED_PREFIXES:
    sd.skip_prefix(prefix)
  sd.check_all_used()
  return {"video": video, "text": text}
