"""A Hugging Face DistilBERT -> our `distilbert` text tower: `init_from='distilbert:PATH'`.

PATH is a model folder as `save_pretrained` writes it (`config.json` + `model.safetensors`, or
`pytorch_model.bin` read with torch's weights-only loader), e.g. `distilbert-base-uncased`, or
one weights file. Keys may carry the `distilbert.` prefix of the task models
(`DistilBertForMaskedLM`, the hub's `distilbert-base-uncased`). D = model.text.width:

    DistilBERT key (after the prefix)           -> our parameter (transformation)
    embeddings.word_embeddings.weight [V, D]     -> text/token_embed/embedding
    embeddings.position_embeddings.weight [P, D] -> text/pos_embed [1, P', D] (the first P'
                                                    rows: P' = model.text.max_positions, or
                                                    data.text_len when that is 0)
    embeddings.LayerNorm.{weight,bias}           -> text/embed_norm/{scale,bias}
    transformer.layer.i.attention.{q,k,v}_lin    -> text/blocks/layers/i/attn/qkv (the three
      .{weight [D, D], bias [D]}                    [D, D]^T kernels side by side: q|k|v, each
                                                    (head, head_dim) as DistilBERT splits them)
    transformer.layer.i.attention.out_lin        -> .../attn/proj (transposed)
    transformer.layer.i.sa_layer_norm            -> .../norm1 (post-LN: after attention)
    transformer.layer.i.ffn.lin1, ffn.lin2       -> .../mlp/fc1, .../mlp/fc2 (transposed)
    transformer.layer.i.output_layer_norm        -> .../norm2 (post-LN: after the MLP)

Reported and not converted: the task heads (`vocab_transform`, `vocab_layer_norm`,
`vocab_projector`, `pre_classifier`, `classifier`) and the `position_ids` buffer. With a
`config.json`, a width, depth, head count, MLP width, vocabulary or position table that differs
from this config is an error naming the file and both numbers, before any tensor is read.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tvts_jax.convert import state_dict as sd_lib
from tvts_jax.models import text_tower

PREFIX = "distilbert."
SKIPPED_PREFIXES = ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.",
                    "pre_classifier.", "classifier.", "embeddings.position_ids")
# config.json key -> (our config key, how to read it off the config).
_CONFIG_KEYS = {
    "dim": ("model.text.width", lambda c: c.model.text.width),
    "n_layers": ("model.text.depth", lambda c: c.model.text.depth),
    "n_heads": ("model.text.num_heads", lambda c: c.model.text.num_heads),
    "hidden_dim": ("model.text.mlp_dim", lambda c: c.model.text.mlp_dim),
    "vocab_size": ("model.text.vocab_size", lambda c: c.model.text.vocab_size),
}


def check_hf_config(path: str, config) -> None:
  """Compares a folder's `config.json` with this config; ConversionError naming both numbers."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else None
  if not file or not os.path.exists(file):
    return
  with open(file) as f:
    theirs = json.load(f)
  for key, (ours, value) in _CONFIG_KEYS.items():
    if key in theirs and theirs[key] != value(config):
      raise sd_lib.ConversionError(
          f"{file}: the DistilBERT checkpoint has {key}={theirs[key]}, this config builds "
          f"{ours}={value(config)}; set {ours}={theirs[key]} (configs/paper.py has "
          "distilbert-base-uncased's)")
  positions = theirs.get("max_position_embeddings")
  if positions is not None and positions < text_tower.num_positions(config):
    raise sd_lib.ConversionError(
        f"{file}: the DistilBERT checkpoint has {positions} positions, this config needs "
        f"{text_tower.num_positions(config)} (model.text.max_positions / data.text_len)")


# One DistilBERT transformer layer (post-LN: sa_layer_norm after attention, output_layer_norm
# after the FFN, in our Block's norm1 / norm2 places).
LAYER = sd_lib.separate_qkv_block(dict(
    norm1="sa_layer_norm", q="attention.q_lin", k="attention.k_lin", v="attention.v_lin",
    out="attention.out_lin", norm2="output_layer_norm", fc1="ffn.lin1", fc2="ffn.lin2"))


def convert_text(sd: sd_lib.StateDict, prefix: str, config) -> dict[str, Any]:
  """DistilBERT's tensors under `prefix` -> our `text` subtree (list layout).

  Raises:
    ConversionError: another text architecture, a missing key, a shape or depth mismatch.
  """
  t = config.model.text
  if t.arch != "distilbert":
    raise sd_lib.ConversionError(
        f"{sd.source}: a DistilBERT text tower needs model.text.arch='distilbert' (this config "
        f"has {t.arch!r})")
  d, m = t.width, t.mlp_dim
  positions = text_tower.num_positions(config)
  pos = sd.take(f"{prefix}embeddings.position_embeddings.weight", "text/pos_embed")
  if pos.ndim != 2 or pos.shape[1] != d or pos.shape[0] < positions:
    raise sd_lib.ConversionError(
        f"{sd.source}: {prefix}embeddings.position_embeddings.weight has shape {pos.shape}; "
        f"this config needs at least {positions} positions of width {d}")
  if pos.shape[0] > positions:
    sd.report.notes.append(f"text position table cut {pos.shape[0]} -> {positions} rows")
  found = sd.count_indexed(f"{prefix}transformer.layer.")
  if found != t.depth:
    raise sd_lib.ConversionError(f"{sd.source}: {found} DistilBERT layers, this config builds "
                                 f"model.text.depth={t.depth}")
  return {
      "token_embed": {"embedding": sd.take(f"{prefix}embeddings.word_embeddings.weight",
                                           "text/token_embed/embedding", (t.vocab_size, d))},
      "pos_embed": pos[None, :positions],
      "embed_norm": sd_lib.layer_norm(sd, f"{prefix}embeddings.LayerNorm", "text/embed_norm", d),
      "blocks": sd_lib.blocks(sd, f"{prefix}transformer.layer", "text/blocks", t.depth, d, m,
                              LAYER),
  }


def convert(sd: sd_lib.StateDict, config) -> dict[str, Any]:
  """A DistilBERT state dict (with or without `distilbert.`) -> `{'text': ...}`."""
  prefix = PREFIX if any(k.startswith(PREFIX) for k in sd.keys()) else ""
  text = convert_text(sd, prefix, config)
  for skipped in SKIPPED_PREFIXES:
    sd.skip_prefix(skipped)
    sd.skip_prefix(prefix + skipped)
  sd.check_all_used()
  return {"text": text}
