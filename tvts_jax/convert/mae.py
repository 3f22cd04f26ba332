"""ImageNet MAE ViT (timm / MAE key layout) -> our video tower: `init_from='mae:PATH'`.

The paper initialises its video encoder from MAE's ImageNet ViT-B/16 (`mae_pretrain_vit_base.pth`,
whose tensors sit under the key `model`). Mapping (D = width, p = patch, t = tubelet):

    MAE / timm key                      -> our parameter (transformation)
    patch_embed.proj.weight [D, 3, p, p] -> video/patch_embed/kernel [t, p, p, 3, D]
                                           (`w.transpose(2, 3, 1, 0)` copied onto each of the
                                           t time steps, NOT divided by t: the reference's
                                           `repeat`)
    patch_embed.proj.bias [D]            -> video/patch_embed/bias
    cls_token [1, 1, D]                  -> video/cls_token
    pos_embed [1, 1 + g*g, D]            -> video/pos_embed [1, 1 + N, D] (the g x g grid
                                           resized bicubically when g*g != N; CLS slot kept)
    blocks.i.norm1.{weight,bias}         -> video/blocks/layers/i/norm1/{scale,bias}
    blocks.i.attn.qkv.{weight,bias}      -> video/blocks/layers/i/attn/qkv/{kernel,bias}
                                           (weight transposed; rows q|k|v, head, head_dim
                                           already match our columns)
    blocks.i.attn.proj.*, blocks.i.norm2.*, blocks.i.mlp.fc1.*, blocks.i.mlp.fc2.*
                                         -> likewise (Linear weights transposed)
    norm.{weight,bias}                   -> video/norm/{scale,bias}

Not in MAE, so left at their initialisation: `video/temporal_embed` (zero-init, as in the
reference), the text tower, the sorter and the projections.

Present in some MAE files and deliberately not converted (reported in the log): the MAE decoder
(`decoder_*`, `mask_token`) and a classification head (`head.*`, `fc_norm.*`). A checkpoint
fine-tuned with global pooling has `fc_norm` instead of `norm`: `norm.weight` is then reported
missing. Any other key is an error that names it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tvts_jax import config_schema
from tvts_jax.convert import state_dict as sd_lib

# Keys of MAE files that are not part of the encoder: reported, not converted.
SKIPPED_PREFIXES = ("decoder_", "mask_token", "head.", "fc_norm.")


def convert(sd: sd_lib.StateDict, config) -> dict[str, Any]:
  """Maps an MAE / timm ViT state dict onto our video tower.

  Args:
    sd: the foreign state dict (`state_dict.load_state_dict` wrapped in `StateDict`).
    config: the run config (model.video, data.image_size, data.num_frames).

  Returns:
    `{'video': {...}}`, a nested dict of float32 numpy arrays in our list layout, holding every
    video-tower parameter except `temporal_embed`.

  Raises:
    state_dict.ConversionError: a missing key, an unexpected key or a shape mismatch (named).
  """
  v = config.model.video
  d, p, t = v.width, v.patch_size, v.tubelet
  n = config_schema.num_tokens_per_slice(config)

  w = sd.take("patch_embed.proj.weight", "video/patch_embed/kernel", (d, 3, p, p))
  kernel = np.broadcast_to(w.transpose(2, 3, 1, 0)[None], (t, p, p, 3, d)).copy()
  pos = sd_lib.pos_embed(sd, "pos_embed", "video/pos_embed", d, n)
  video = {
      "patch_embed": {
          "kernel": kernel,
          "bias": sd.take("patch_embed.proj.bias", "video/patch_embed/bias", (d,))},
      "cls_token": sd.take("cls_token", "video/cls_token", (1, 1, d)),
      "pos_embed": pos,
      "blocks": sd_lib.blocks(sd, "blocks", "video/blocks", v.depth, d, v.mlp_dim),
      "norm": sd_lib.layer_norm(sd, "norm", "video/norm", d),
  }
  for prefix in SKIPPED_PREFIXES:
    sd.skip_prefix(prefix)
  sd.check_all_used()
  return {"video": video}
