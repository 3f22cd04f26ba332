"""A released TVTSv2 checkpoint (PyTorch) -> our model: `init_from='tvts_v2_torch:PATH'`.

The TVTSv2 trainer saves `{'state_dict': model.state_dict(), 'config': ..., ...}` from a
DistributedDataParallel model (keys accepted with or without `module.`). Its `config` is a
pickled object that torch's weights-only loader refuses: the error says how to re-save the
`state_dict` alone once, in an environment you trust. The layout, read off the published code
(TVTSv2, ViT-B/16; D = 768 video width, Dt = 512 text width):

    TVTSv2 key                                   -> our parameter (transformation)
    video_model.conv1.weight [D, 3, p, p]         -> video/patch_embed/kernel (per frame)
    video_model.class_embedding [D]               -> video/cls_token
    video_model.positional_embedding [1 + N, D]   -> video/pos_embed (grid resized if N differs)
    video_model.temporal_embedding [T', D]        -> video/temporal_embed [1, T, D] (its first
                                                     T = data.num_frames / tubelet rows)
    video_model.ln_pre, ln_post                   -> video/ln_pre, video/norm
    video_model.proj [D, Pv] (x @ proj)           -> video/proj/kernel (as is)
    video_model.transformer.resblocks.i.
      attn.{qkv, proj}                            -> video/blocks/layers/i/attn/{qkv, proj}
      timeattn.{qkv, proj}                        -> .../time_attn/{qkv, proj}
      ln_1, ln_2, ln_3                            -> .../norm1, norm2, time_norm
      mlp.c_fc, mlp.c_proj                        -> .../mlp/fc1, mlp/fc2
    text_token_embedding.weight                   -> text/token_embed/embedding
    text_positional_embedding [77, Dt]            -> text/pos_embed [1, 77, Dt]
    text_model.resblocks.i.attn.in_proj_{weight [3Dt, Dt], bias}
                                                  -> text/blocks/layers/i/attn/qkv (transposed:
                                                     its rows q|k|v are our columns)
    text_model.resblocks.i.attn.out_proj, ln_1, ln_2, mlp.c_fc, mlp.c_proj
                                                  -> .../attn/proj, norm1, norm2, mlp/fc1, fc2
    text_ln_final                                 -> text/norm
    text_projection [Dt, Pt] (x @ W)              -> text/proj/kernel (as is)
    pred_model.* (training checkpoints only)      -> sorter/* (the TVTS v1 sorter's layout)

The released downstream checkpoints have no `pred_model`: the sorter then keeps its
initialisation (reported). Any other key is an error that names it.
"""

from __future__ import annotations

from typing import Any

from tvts_jax import config_schema
from tvts_jax.convert import clip as clip_lib
from tvts_jax.convert import state_dict as sd_lib
from tvts_jax.convert import tvts_torch
from tvts_jax.models import text_tower


def _video_block(sd, key, ours, width, mlp_dim):
  lin = lambda k, o, i, j: sd_lib.linear(sd, f"{key}.{k}", f"{ours}/{o}", i, j)
  norm = lambda k, o: sd_lib.layer_norm(sd, f"{key}.{k}", f"{ours}/{o}", width)
  return {
      "norm1": norm("ln_1", "norm1"),
      "attn": {"qkv": lin("attn.qkv", "attn/qkv", width, 3 * width),
               "proj": lin("attn.proj", "attn/proj", width, width)},
      "time_norm": norm("ln_3", "time_norm"),
      "time_attn": {"qkv": lin("timeattn.qkv", "time_attn/qkv", width, 3 * width),
                    "proj": lin("timeattn.proj", "time_attn/proj", width, width)},
      "norm2": norm("ln_2", "norm2"),
      "mlp": {"fc1": lin("mlp.c_fc", "mlp/fc1", width, mlp_dim),
              "fc2": lin("mlp.c_proj", "mlp/fc2", mlp_dim, width)},
  }


def _text_block(sd, key, ours, width, mlp_dim):
  w = sd.take(f"{key}.attn.in_proj_weight", f"{ours}/attn/qkv/kernel", (3 * width, width))
  return {
      "norm1": sd_lib.layer_norm(sd, f"{key}.ln_1", f"{ours}/norm1", width),
      "attn": {"qkv": {"kernel": w.T,
                       "bias": sd.take(f"{key}.attn.in_proj_bias", f"{ours}/attn/qkv/bias",
                                       (3 * width,))},
               "proj": sd_lib.linear(sd, f"{key}.attn.out_proj", f"{ours}/attn/proj", width,
                                     width)},
      "norm2": sd_lib.layer_norm(sd, f"{key}.ln_2", f"{ours}/norm2", width),
      "mlp": {"fc1": sd_lib.linear(sd, f"{key}.mlp.c_fc", f"{ours}/mlp/fc1", width, mlp_dim),
              "fc2": sd_lib.linear(sd, f"{key}.mlp.c_proj", f"{ours}/mlp/fc2", mlp_dim, width)},
  }


def convert(sd: sd_lib.StateDict, config) -> dict[str, Any]:
  """A TVTSv2 state dict (`module.` already stripped) -> our parameters (list layout)."""
  clip_lib.require(config, sd, "TVTSv2")
  v, t = config.model.video, config.model.text
  if v.attention_layout != "divided":
    raise sd_lib.ConversionError(f"{sd.source}: a TVTSv2 checkpoint has divided space-time "
                                 "attention: set model.video.attention_layout='divided'")
  d, dt = v.width, t.width
  n = config_schema.num_tokens_per_slice(config)
  tubes = config.data.num_frames // v.tubelet
  vm = "video_model."
  temporal = sd.take(f"{vm}temporal_embedding", "video/temporal_embed")
  if temporal.ndim != 2 or temporal.shape[1] != d or temporal.shape[0] < tubes:
    raise sd_lib.ConversionError(f"{sd.source}: {vm}temporal_embedding has shape "
                                 f"{temporal.shape}; this config needs {tubes} frames of "
                                 f"width {d}")
  pos = sd.take(f"{vm}positional_embedding", "video/pos_embed")
  video = {
      "patch_embed": {"kernel": clip_lib.patch_kernel(
          sd.take(f"{vm}conv1.weight", "video/patch_embed/kernel",
                  (d, 3, v.patch_size, v.patch_size)), v.tubelet)},
      "cls_token": sd.take(f"{vm}class_embedding", "video/cls_token", (d,)).reshape(1, 1, d),
      "pos_embed": sd_lib.resize_pos_embed(pos[None], n),
      "temporal_embed": temporal[None, :tubes],
      "ln_pre": sd_lib.layer_norm(sd, f"{vm}ln_pre", "video/ln_pre", d),
      "blocks": sd_lib.blocks(sd, f"{vm}transformer.resblocks", "video/blocks", v.depth, d,
                              v.mlp_dim, _video_block),
      "norm": sd_lib.layer_norm(sd, f"{vm}ln_post", "video/norm", d),
      "proj": {"kernel": sd.take(f"{vm}proj", "video/proj/kernel", (d, v.proj_dim))},
  }
  text = {
      "token_embed": {"embedding": sd.take("text_token_embedding.weight",
                                           "text/token_embed/embedding", (t.vocab_size, dt))},
      "pos_embed": clip_lib.positions(sd, "text_positional_embedding", "text/pos_embed", dt,
                                      text_tower.num_positions(config)),
      "blocks": sd_lib.blocks(sd, "text_model.resblocks", "text/blocks", t.depth, dt,
                              t.mlp_dim, _text_block),
      "norm": sd_lib.layer_norm(sd, "text_ln_final", "text/norm", dt),
      "proj": {"kernel": sd.take("text_projection", "text/proj/kernel", (dt, t.proj_dim))},
  }
  out = {"video": video, "text": text}
  if "pred_model.type_embed" in sd:
    out["sorter"] = tvts_torch.convert_sorter(sd, config)
  sd.check_all_used()
  return out
