"""The reference TVTS v1 PyTorch checkpoint -> our model: `init_from='tvts_torch:PATH'`.

The reference trainer saves `{'state_dict': model.state_dict(), ...}` from a
DistributedDataParallel model, so every key starts with `module.` (accepted with or without it).
The layout below is read off the public reference code (TencentARC/TVTS, `v1/model/
model_dist_TVTS.py`, `v1/model/video_encoder.py`, and the `SortTransformer` of the repository's
`model/SortFormer.py`); no released checkpoint was available to check it against, so the test
builds a PyTorch re-implementation of that layout (tests/test_convert.py).

D = video width, Dt = text width, E = model.embed_dim, K = data.num_clips, t/p = tubelet/patch.

    reference key (after `module.`)       -> our parameter (transformation)
    video_model.patch_embed.proj.weight   -> video/patch_embed/kernel [t, p, p, 3, D]
      [D, 3, t, p, p] (Conv3d)               (`transpose(2, 3, 4, 1, 0)`)
    video_model.patch_embed.proj.bias [D] -> video/patch_embed/bias
    video_model.cls_token [1, 1, D]       -> video/cls_token
    video_model.pos_embed [1, 1 + N, D]   -> video/pos_embed (grid resized bicubically if N
                                             differs)
    video_model.temporal_embed [1, S, D]  -> video/temporal_embed (S must equal
                                             data.num_frames / tubelet)
    video_model.blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*
                                          -> video/blocks/layers/i/... (Linear weights
                                             transposed, LayerNorm weight -> scale)
    video_model.norm.*                    -> video/norm/{scale,bias}
    pred_model.type_embed [1, 2, D]       -> sorter/type_embed [2, D]
    pred_model.blocks.i.*                 -> sorter/blocks/layers/i/... (as the video blocks)
    pred_model.norm.*                     -> sorter/norm
    pred_model.head.{weight [K, D], bias} -> sorter/head (transposed)
    vid_proj.0.{weight [E, D], bias}      -> video_proj (transposed; nn.Sequential(Linear))
    txt_proj.1.{weight [E, Dt], bias}     -> text_proj (transposed; nn.Sequential(ReLU,
                                             Linear))

`vid_proj.weight` / `txt_proj.weight` (a bare Linear) are accepted too.

`text_model.*` is the reference's DistilBERT (a Hugging Face `DistilBertModel`). With
`model.text.arch='distilbert'` it is converted into `text/*` as `convert/distilbert.py` maps it,
so a reference checkpoint loads whole: video tower, text tower, sorter and both projections.
With another text architecture it is reported and not converted (our `text/*` keeps its
initialisation; `text_proj` is converted all the same, but was trained on DistilBERT features).
`sorter/text_proj` exists only when model.text.width != model.video.width (the reference has
none) and keeps its initialisation. Any other key is an error that names it.

Uncertain about the real checkpoints: whether the released files keep the `module.` prefix
(both accepted), whether `pred_model` ever had extra tensors (e.g. a position embedding; it
would be reported as an unexpected key, not dropped), and the released checkpoints also pickle
a training-config object, which the weights-only loader refuses with instructions to re-save
the `state_dict` alone.
"""

from __future__ import annotations

from typing import Any

from tvts_jax import config_schema
from tvts_jax.convert import distilbert
from tvts_jax.convert import state_dict as sd_lib

DDP_PREFIX = "module."
TEXT_PREFIX = "text_model."


def strip_ddp_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
  """Removes the DistributedDataParallel `module.` prefix when every key has it."""
  if tensors and all(k.startswith(DDP_PREFIX) for k in tensors):
    return {k[len(DDP_PREFIX):]: v for k, v in tensors.items()}
  return dict(tensors)


def _projection(sd: sd_lib.StateDict, names: tuple[str, str], ours: str, in_features: int,
                out_features: int) -> dict[str, Any]:
  key = names[0] if f"{names[0]}.weight" in sd else names[1]
  return sd_lib.linear(sd, key, ours, in_features, out_features)


def convert_sorter(sd: sd_lib.StateDict, config) -> dict[str, Any]:
  """`pred_model.*` (the reference's SortTransformer, also TVTSv2's) -> our `sorter` (all but
  its `text_proj`), at the width of the video tower's output."""
  s, k = config.model.sorter, config.data.num_clips
  d = config_schema.output_widths(config)[0]
  return {
      "type_embed": sd.take("pred_model.type_embed", "sorter/type_embed", (1, 2, d))[0],
      "blocks": sd_lib.blocks(sd, "pred_model.blocks", "sorter/blocks", s.depth, d, s.mlp_dim),
      "norm": sd_lib.layer_norm(sd, "pred_model.norm", "sorter/norm", d),
      "head": sd_lib.linear(sd, "pred_model.head", "sorter/head", d, k),
  }


def convert(sd: sd_lib.StateDict, config) -> dict[str, Any]:
  """Maps a reference TVTS state dict (prefix already stripped) onto our parameters.

  Args:
    sd: the foreign state dict, keys without `module.` (see `strip_ddp_prefix`).
    config: the run config.

  Returns:
    A nested dict of numpy arrays in our list layout: `video` (all of it), `sorter` (all but
    `text_proj`), `video_proj`, `text_proj`, and `text` when model.text.arch='distilbert'.

  Raises:
    state_dict.ConversionError: a missing key, an unexpected key or a shape mismatch (named).
  """
  v = config.model.video
  d, p, t = v.width, v.patch_size, v.tubelet
  dt, e = config.model.text.width, config.model.embed_dim
  n = config_schema.num_tokens_per_slice(config)
  num_tubes = config.data.num_frames // t

  w = sd.take("video_model.patch_embed.proj.weight", "video/patch_embed/kernel",
              (d, 3, t, p, p))
  pos = sd_lib.pos_embed(sd, "video_model.pos_embed", "video/pos_embed", d, n)
  video = {
      "patch_embed": {
          "kernel": w.transpose(2, 3, 4, 1, 0),
          "bias": sd.take("video_model.patch_embed.proj.bias", "video/patch_embed/bias", (d,))},
      "cls_token": sd.take("video_model.cls_token", "video/cls_token", (1, 1, d)),
      "pos_embed": pos,
      "temporal_embed": sd.take("video_model.temporal_embed", "video/temporal_embed",
                                (1, num_tubes, d)),
      "blocks": sd_lib.blocks(sd, "video_model.blocks", "video/blocks", v.depth, d, v.mlp_dim),
      "norm": sd_lib.layer_norm(sd, "video_model.norm", "video/norm", d),
  }
  out = {
      "video": video,
      "sorter": convert_sorter(sd, config),
      "video_proj": _projection(sd, ("vid_proj.0", "vid_proj"), "video_proj", d, e),
      "text_proj": _projection(sd, ("txt_proj.1", "txt_proj"), "text_proj", dt, e),
  }
  if config.model.text.arch == "distilbert":
    out["text"] = distilbert.convert_text(sd, TEXT_PREFIX, config)
    sd.skip_prefix(TEXT_PREFIX + "embeddings.position_ids")  # a buffer, in older transformers
  else:
    sd.skip_prefix(TEXT_PREFIX)
  sd.check_all_used()
  return out
