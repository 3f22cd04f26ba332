"""Foreign checkpoints -> our parameters: `load_init(config, params)`, used by the trainer.

    --config.init_from=mae:/path/mae_pretrain_vit_base.pth         # ImageNet MAE ViT (the paper)
    --config.init_from=distilbert:/path/distilbert-base-uncased    # a Hugging Face DistilBERT
    --config.init_from=mae:/w/mae.pth,distilbert:/w/distilbert     # several, applied in order
    --config.init_from=tvts_torch:/path/tvts_checkpoint.pth        # the reference's PyTorch TVTS
    --config.init_from=clip:/path/clip-vit-base-patch16            # both towers from CLIP (v2)
    --config.init_from=tvts_v2_torch:/path/TVTSv2_ViT_B_16.pth     # a released TVTSv2 model

Each kind has a module that documents its key mapping (`mae.py`, `distilbert.py`,
`clip.py`, `tvts_torch.py`, `tvts_v2_torch.py`); each source is reported in the log (converted, skipped), and at the end which
of our parameters kept their initialisation. Files are
`.safetensors` or PyTorch pickles read with torch's weights-only loader (torch is an optional
dependency, imported only for those). Every foreign key is used, or deliberately skipped and
reported in the log, or an error that names it; a shape that does not fit this config is an
error that names the key and both shapes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from tvts_jax import config_schema
from tvts_jax.convert import clip, distilbert, mae, tvts_torch, tvts_v2_torch
from tvts_jax.convert import state_dict as sd_lib
from tvts_jax.convert.state_dict import ConversionError, load_state_dict  # noqa: F401
from tvts_jax.models import layers


def _mae(path: str, config) -> tuple[dict[str, Any], sd_lib.Report]:
  sd = sd_lib.StateDict(load_state_dict(path, ("model", "state_dict")), path)
  return mae.convert(sd, config), sd.report


def _distilbert(path: str, config) -> tuple[dict[str, Any], sd_lib.Report]:
  distilbert.check_hf_config(path, config)
  file = sd_lib.hf_weights_file(path)
  sd = sd_lib.StateDict(load_state_dict(file, ("state_dict", "model")), file)
  return distilbert.convert(sd, config), sd.report


def _clip(path: str, config) -> tuple[dict[str, Any], sd_lib.Report]:
  file = sd_lib.hf_weights_file(path)
  sd = sd_lib.StateDict(load_state_dict(file, ("state_dict", "model")), file)
  return clip.convert(sd, config), sd.report


def _tvts_v2_torch(path: str, config) -> tuple[dict[str, Any], sd_lib.Report]:
  sd = sd_lib.StateDict(
      tvts_torch.strip_ddp_prefix(load_state_dict(path, ("state_dict", "model"))), path)
  return tvts_v2_torch.convert(sd, config), sd.report


def _tvts_torch(path: str, config) -> tuple[dict[str, Any], sd_lib.Report]:
  sd = sd_lib.StateDict(
      tvts_torch.strip_ddp_prefix(load_state_dict(path, ("state_dict", "model"))), path)
  return tvts_torch.convert(sd, config), sd.report


# The `init_from` prefix -> fn(path, config) -> (converted list-layout tree, report).
CONVERTERS: dict[str, Callable[[str, Any], tuple[dict[str, Any], sd_lib.Report]]] = {
    "mae": _mae,
    "distilbert": _distilbert,
    "clip": _clip,
    "tvts_torch": _tvts_torch,
    "tvts_v2_torch": _tvts_v2_torch,
}
assert set(CONVERTERS) == set(config_schema.INIT_KINDS)


def parse_init_from(init_from: str) -> list[tuple[str, str]]:
  """'KIND:PATH[,KIND:PATH...]' -> [(kind, path)]; ConversionError for an unknown kind."""
  sources = config_schema.init_sources(init_from)
  for kind, path in sources:
    if kind not in CONVERTERS or not path:
      raise ConversionError(f"init_from={init_from!r}: {kind + ':' + path!r} is not one of "
                            f"{[k + ':PATH' for k in CONVERTERS]}")
  return sources


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _place_like(value: np.ndarray, like: Any) -> Any:
  """`value` with the dtype and (possibly multi-host) sharding of the array `like`."""
  value = np.asarray(value, dtype=like.dtype)
  if isinstance(like, jax.Array):
    # From a callback, so each host only materialises its own shards (works across hosts,
    # where every process holds the same converted numpy value).
    return jax.make_array_from_callback(value.shape, like.sharding, lambda idx: value[idx])
  return value


def merge_into_params(params: Any, converted: dict[str, Any], config,
                      report: sd_lib.Report | None = None) -> Any:
  """Replaces the converted leaves of `params`, keeping dtypes and shardings.

  Args:
    params: the model parameters: a pure nested dict (as in the train state) or an `nnx.State`.
    converted: nested numpy dict in our list layout (a subset of the parameter tree).
    config: reads model.scan_layers (converted stacks are stacked to match).
    report: if given, `kept_init` is filled with our paths the conversion did not provide.

  Returns:
    A new tree of the same type and structure as `params`.

  Raises:
    ConversionError: a converted path that our model lacks, or a shape mismatch.
  """
  if config.model.scan_layers:
    converted = jax.tree.map(np.asarray, layers.to_scanned_layout(converted))
  is_state = hasattr(params, "to_pure_dict")
  pure = params.to_pure_dict() if is_state else params
  ours = _flatten(pure)
  new = _flatten(converted)
  for path, value in new.items():
    if path not in ours:
      raise ConversionError(f"converted parameter {_path_str(path)} does not exist in this "
                            "model (a config option that removes it?)")
    if tuple(ours[path].shape) != tuple(np.shape(value)):
      raise ConversionError(f"converted parameter {_path_str(path)} has shape "
                            f"{tuple(np.shape(value))}, this config builds "
                            f"{tuple(ours[path].shape)}")
  if report is not None:
    report.kept_init = sorted(_path_str(p) for p in ours if p not in new)

  def rebuild(tree, prefix=()):
    if isinstance(tree, dict):
      return {k: rebuild(v, prefix + (k,)) for k, v in tree.items()}
    return _place_like(new[prefix], tree) if prefix in new else tree

  merged = rebuild(pure)
  if not is_state:
    return merged
  out = jax.tree.map(lambda x: x, params)  # a new State; the caller's stays untouched
  out.replace_by_pure_dict(merged)
  return out


def load_init(config, params: Any,
              reports: list[tuple[str, sd_lib.Report]] | None = None) -> Any:
  """Initialises `params` from the sources of `config.init_from`, in order.

  A later source overwrites what an earlier one converted. Each source's report (converted,
  skipped) is logged, then the parameters no source provided (they keep their init).

  Args:
    config: the run config.
    params: the freshly initialised parameters (nnx.State or pure dict, possibly sharded).
    reports: if given, receives one (source, report) per source; the last report's
      `kept_init` lists the parameters no source provided.

  Returns:
    The parameters with every converted tensor replaced (same structure, dtypes, shardings).

  Raises:
    ConversionError: an unknown kind, or a checkpoint that does not fit this config (the
      message names the key).
    FileNotFoundError, ImportError: no such file; a PyTorch file without torch installed.
  """
  provided: set[tuple] = set()
  report = None
  for kind, path in parse_init_from(config.init_from):
    converted, report = CONVERTERS[kind](path, config)
    params = merge_into_params(params, converted, config, report)
    provided |= set(_flatten(layers.to_scanned_layout(converted) if config.model.scan_layers
                             else converted))
    report.kept_init = []  # said once, for all sources together, below
    logging.info("init_from %s:%s: %s", kind, path, report.summary())
    if reports is not None:
      reports.append((f"{kind}:{path}", report))
  if report is not None:
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    report.kept_init = sorted(_path_str(p) for p in _flatten(pure) if p not in provided)
    if report.kept_init:
      logging.info("init_from: %d of our parameters keep their initialisation: %s",
                   len(report.kept_init), sd_lib.abbreviate(report.kept_init))
  return params
