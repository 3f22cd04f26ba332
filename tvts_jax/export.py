"""Standalone export of a trained model, and loading it without the trainer.

    python main.py --mode=export --workdir=DIR --export_path=encoder.safetensors
    python main.py --mode=export --workdir=DIR --export_path=tvts.npz --export_full

    import tvts_jax
    encoder = tvts_jax.load_video_encoder("encoder.safetensors")
    features = encoder.embed(video)        # uint8 [B, T, H, W, 3] -> float32 [B, D] (CLS)
    model = tvts_jax.load_model("tvts.npz")               # an --export_full file
    scores = model.embed_text(["he cuts the onion"]) @ model.embed_video(video).T

File format (version 1). One file holds the parameters, keyed by their path in the model's
parameter tree in the list layout (`video/blocks/layers/0/attn/qkv/kernel`, whatever
`model.scan_layers` was in training), float32:
  - `.safetensors`: the metadata JSON is embedded in the header under `__metadata__["tvts_jax"]`.
  - `.npz` (uncompressed, no pickles): the metadata JSON is the 0-d string array `__metadata__`.
The metadata is `{"format": "tvts-jax-export", "format_version": 1, "contents":
"video_encoder" | "full", "step": N, "config": {the whole run config}}`. The same JSON (plus
every parameter's shape) is written next to the file as `FILE.json` for people and other tools;
the loader reads the embedded copy, and falls back to `FILE.json` for a file without one.

`video_encoder` holds the `video/...` parameters only; `full` (`--export_full`) holds the whole
TVTS model (text tower, sorter, projections) and loads with `load_model`; the run's tokenizer is
copied beside it (`FILE.tokenizer.json` or `FILE.tokenizer.model`, named in the metadata's
`tokenizer`), so the loaded model embeds text as well as video.

This module imports neither orbax, TensorFlow nor the trainer (only `export_checkpoint`, which
reads a training workdir, does so lazily).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tvts_jax import config_schema, sharding
from tvts_jax.models import layers

FORMAT_NAME = "tvts-jax-export"
FORMAT_VERSION = 1
CONTENTS = ("video_encoder", "full")
SUFFIXES = (".safetensors", ".npz")
_META_KEY = "tvts_jax"  # safetensors header metadata key
_NPZ_META = "__metadata__"  # npz member holding the metadata JSON


class ExportError(ValueError):
  """An export file that cannot be read or does not match the model its config builds."""


# ---------------------------------------------------------------------------------------------
# Flat parameter dicts.


def flatten_params(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
  """Nested parameter dict -> {'a/b/0/c': leaf}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_params(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[Any, Any]:
  """{'a/b/0/c': leaf} -> nested dict; all-digit segments become int keys (nnx list indices)."""
  out: dict[Any, Any] = {}
  for path, value in flat.items():
    node = out
    parts = [int(p) if p.isdigit() else p for p in path.split("/")]
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out


def host_params(params: Any, full: bool = True) -> dict[str, np.ndarray]:
  """Model parameters -> flat {path: numpy} in the list layout, complete on every host.

  Args:
    params: the TVTS model's parameters, an `nnx.State` or the equivalent pure dict; any
      sharding, either block layout. Every process must call this (gathering is collective).
    full: keep everything; False keeps the `video/...` subtree only.

  Returns:
    {'video/blocks/layers/0/attn/qkv/kernel': np.ndarray, ...}.
  """
  pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else dict(params)
  if not full:
    if "video" not in pure:
      raise ExportError(f"no 'video' subtree in the parameters (top level: {list(pure)})")
    pure = {"video": pure["video"]}
  # Gathered first, so that splitting scanned stacks is plain numpy slicing.
  pure = layers.to_list_layout(jax.tree.map(sharding.to_host, pure))
  return {k: np.ascontiguousarray(v) for k, v in flatten_params(pure).items()}


# ---------------------------------------------------------------------------------------------
# Writing.


def _check_suffix(path: str) -> str:
  suffix = os.path.splitext(path)[1]
  if suffix not in SUFFIXES:
    raise ExportError(f"export path {path!r}: the extension must be one of {SUFFIXES}")
  return suffix


def _atomic_write(path: str, data: bytes) -> None:
  """Writes to a temporary name, then renames: a crash never leaves a half file at `path`."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_export(path: str, flat: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> str:
  """Writes a flat parameter dict and its metadata (format in the module docstring).

  Args:
    path: `.safetensors` or `.npz` file (its directory is created).
    flat: {path: numpy array}.
    metadata: JSON-able dict; `format` and `format_version` are added.

  Returns:
    `path`. The sidecar `path + '.json'` is written too.
  """
  suffix = _check_suffix(path)
  meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata}
  meta_json = json.dumps(meta, sort_keys=True)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  arrays = {k: np.ascontiguousarray(v) for k, v in flat.items()}
  if suffix == ".safetensors":
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    data = st_numpy.save(arrays, metadata={_META_KEY: meta_json})
  else:
    import io  # pylint: disable=g-import-not-at-top
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{_NPZ_META: np.array(meta_json)})
    data = buffer.getvalue()
  _atomic_write(path, data)
  sidecar = dict(meta, params={k: list(v.shape) for k, v in sorted(arrays.items())})
  _atomic_write(path + ".json", json.dumps(sidecar, indent=2, sort_keys=True).encode())
  return path


def tokenizer_file(path: str, tokenizer_path: str) -> str:
  """Where a full export keeps its tokenizer: `FILE.tokenizer.json` or `FILE.tokenizer.model`."""
  return path + ".tokenizer" + (".json" if tokenizer_path.endswith(".json") else ".model")


def export_params(config: ml_collections.ConfigDict, params: Any, path: str, *,
                  full: bool = False, step: int | None = None,
                  tokenizer_path: str = "") -> str:
  """Exports the video encoder (or with `full`, the whole model) of `params` to `path`.

  Every process must call it (gathering sharded parameters is collective); process 0 writes.

  Args:
    config: the config the parameters were trained with (stored in the file).
    params: the TVTS model's parameters (`nnx.State` or pure dict; any sharding and layout).
    path: `.safetensors` or `.npz`.
    full: export the whole model instead of the video tower alone.
    step: the training step, recorded in the metadata.
    tokenizer_path: with `full`, the run's tokenizer, copied beside the file
      (`tokenizer_file`) so that `load_model` can embed text.

  Returns:
    `path`.
  """
  _check_suffix(path)
  flat = host_params(params, full=full)
  meta = {"contents": "full" if full else "video_encoder",
          "step": None if step is None else int(step),
          "config": json.loads(config.to_json_best_effort())}
  if jax.process_index() == 0:
    if full and tokenizer_path:
      from data_pipelines import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
      if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
      copy = tokenizer_file(path, tokenizer_path)
      _atomic_write(copy, tok_lib.read_bytes(tokenizer_path))
      meta["tokenizer"] = os.path.basename(copy)
    write_export(path, flat, meta)
  return path


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str, path: str, *,
                      full: bool = False) -> str:
  """Exports the latest checkpoint of a training workdir (`main.py --mode=export`).

  Args:
    config: the training config (its model must match WORKDIR/config.json).
    workdir: the training workdir.
    path: `.safetensors` or `.npz`.
    full: export the whole model.

  Returns:
    `path`.
  """
  from tvts_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top  # orbax
  _check_suffix(path)
  workdir_lib.check_workdir_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  params, step = workdir_lib.restore_params(config, workdir, mesh)
  tokenizer_path = ""
  if full:  # the run's tokenizer (the demo's, when it trained on the demo data)
    from tvts_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    tokenizer_path = input_pipeline.resolve_data(config, workdir)["tokenizer"]
  export_params(config, params, path, full=full, step=step, tokenizer_path=tokenizer_path)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.info("exported %s (step %d) of %s to %s", "the whole model" if full else
               "the video encoder", step, workdir, path)
  return path


# ---------------------------------------------------------------------------------------------
# Reading.


def _read_safetensors(path: str) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ExportError(f"{path}: truncated ({size} bytes; not even a safetensors header)")
    (header_len,) = struct.unpack("<Q", head)
    if 8 + header_len > size:
      raise ExportError(f"{path}: truncated or not a safetensors file (header of "
                        f"{header_len} bytes, file of {size})")
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise ExportError(f"{path}: corrupted safetensors header ({e})") from e
  ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
  expected = 8 + header_len + max(ends, default=0)
  if size < expected:
    raise ExportError(f"{path}: truncated: the header describes {expected} bytes, the file "
                      f"has {size} (an interrupted copy or download?)")
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  flat = st_numpy.load_file(path)
  meta = (header.get("__metadata__") or {}).get(_META_KEY)
  return (json.loads(meta) if meta else None), flat


def _read_npz(path: str) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
  import zipfile  # pylint: disable=g-import-not-at-top
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
    raise ExportError(f"{path}: truncated or not an .npz export ({e})") from e
  meta = flat.pop(_NPZ_META, None)
  return (json.loads(str(meta)) if meta is not None else None), flat


def read_export(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads an export file: (metadata, {param path: numpy array}).

  Raises:
    FileNotFoundError: no such file.
    ExportError: a truncated or corrupted file, no metadata, or another format version.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"no export file at {path}")
  suffix = _check_suffix(path)
  meta, flat = (_read_safetensors if suffix == ".safetensors" else _read_npz)(path)
  if meta is None:
    sidecar = path + ".json"
    if not os.path.exists(sidecar):
      raise ExportError(f"{path}: no embedded tvts-jax metadata and no {sidecar}")
    with open(sidecar) as f:
      meta = json.load(f)
  if meta.get("format") != FORMAT_NAME:
    raise ExportError(f"{path}: format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
  if int(meta.get("format_version", -1)) > FORMAT_VERSION:
    raise ExportError(f"{path}: format version {meta.get('format_version')}; this tvts-jax "
                      f"reads up to {FORMAT_VERSION}")
  if meta.get("contents") not in CONTENTS:
    raise ExportError(f"{path}: contents {meta.get('contents')!r}, expected one of {CONTENTS}")
  return meta, flat


def _merge_config(config: ml_collections.ConfigDict, values: Mapping[str, Any],
                  prefix: str = "") -> None:
  for key, value in values.items():
    if prefix + key in config_schema.REPLACED_KEYS or prefix + key == "evals":
      continue  # evaluation settings of an older (or any) run: they shape no parameter
    if key not in config:
      raise ExportError(f"the export's config has key {prefix + key!r}, unknown to this "
                        "tvts-jax (written by a newer version?)")
    if isinstance(config[key], ml_collections.ConfigDict):
      _merge_config(config[key], value, prefix + key + ".")
    elif isinstance(config[key], tuple) and isinstance(value, list):
      config[key] = tuple(value)
    elif isinstance(config[key], float) and isinstance(value, int):
      config[key] = float(value)
    else:
      config[key] = value


def config_from_metadata(meta: Mapping[str, Any],
                         compute_dtype: str | None = None) -> ml_collections.ConfigDict:
  """The model config of an export, for inference: list layout, no remat, attention 'auto'.

  The attention implementation belongs to the machine, not to the weights: an encoder trained
  with 'cudnn' on a GPU loads on a CPU too.

  Args:
    meta: metadata from `read_export`.
    compute_dtype: override the stored `compute_dtype` ('float32' or 'bfloat16').

  Returns:
    A validated config; keys missing from an older export get the value they had then
    (`config_schema.LEGACY_DEFAULTS`, else today's default).
  """
  config = config_schema.base_config()
  for key, value in config_schema.LEGACY_DEFAULTS.items():
    *groups, name = key.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[name] = value
  _merge_config(config, meta["config"])
  config.model.scan_layers = False
  config.model.remat = "none"
  config.model.attention = "auto"
  if compute_dtype is not None:
    config.compute_dtype = compute_dtype
  return config_schema.validate(config)


def _load_into(module_fn, flat: Mapping[str, np.ndarray], prefix: str, path: str):
  """Builds a module abstractly, checks `flat` against its parameters and fills them in."""
  graphdef, state = nnx.split(nnx.eval_shape(module_fn))
  expected = {prefix + k: v for k, v in flatten_params(state.to_pure_dict()).items()}
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ExportError(f"{path}: parameters do not match the model of its config: missing "
                      f"{missing[:5]}, unexpected {unexpected[:5]}")
  for key, value in expected.items():
    if tuple(value.shape) != tuple(flat[key].shape):
      raise ExportError(f"{path}: {key} has shape {tuple(flat[key].shape)}, the config builds "
                        f"{tuple(value.shape)}")
  pure = unflatten_params({k[len(prefix):]: jnp.asarray(flat[k], expected[k].dtype)
                           for k in expected})
  state.replace_by_pure_dict(pure)
  return nnx.merge(graphdef, state)


class VideoEncoder:
  """A loaded video encoder: an NNX module with its parameters, and jitted feature functions.

  Attributes:
    module: the `VideoViT` (parameters inside; `module(video)` gives all tokens).
    graphdef, params: `nnx.split(module)`, for functional use:
      `nnx.merge(encoder.graphdef, encoder.params)(video)`.
    config: the model config stored in the export.
    metadata: the export's metadata (step, contents, format version).
  """

  def __init__(self, module, config: ml_collections.ConfigDict, metadata: Mapping[str, Any]):
    self.module = module
    self.config = config
    self.metadata = dict(metadata)
    self.graphdef, self.params = nnx.split(module)
    graphdef = self.graphdef
    self._tokens = jax.jit(lambda p, v: nnx.merge(graphdef, p)(v))
    self._embed = jax.jit(lambda p, v: nnx.merge(graphdef, p)(v)[:, 0])

  @property
  def input_shape(self) -> tuple[int, int, int, int]:
    """(T, H, W, 3) of one video: data.num_frames, data.image_size x2, RGB."""
    d = self.config.data
    return (d.num_frames, d.image_size, d.image_size, 3)

  @property
  def width(self) -> int:
    """The width D of the features and tokens (the tower's projection width, if it has one)."""
    return self.config.model.video.proj_dim or self.config.model.video.width

  def embed(self, video: Any) -> jax.Array:
    """The evaluation feature: the CLS token after the final LayerNorm, every patch kept.

    Args:
      video: uint8 [B, T, H, W, 3] RGB frames (or float in [0, 255]); `input_shape` per video.

    Returns:
      float32 [B, D].
    """
    return self._embed(self.params, video)

  def tokens(self, video: Any) -> jax.Array:
    """All output tokens: float32 [B, 1 + (T / tubelet) * (H / patch)^2, D], CLS first."""
    return self._tokens(self.params, video)


def load_video_encoder(path: str, *, compute_dtype: str | None = None) -> VideoEncoder:
  """Loads the video encoder of an export file (`video_encoder` or `full`).

  Args:
    path: a `.safetensors` or `.npz` file written by `export_params` / `--mode=export`.
    compute_dtype: override the stored compute dtype ('float32' or 'bfloat16').

  Returns:
    A `VideoEncoder`; `encoder.embed(video)` gives [B, D] features.

  Raises:
    FileNotFoundError: no such file.
    ExportError: a truncated or corrupted file, or parameters that do not match its config.
  """
  from tvts_jax.models.video_vit import VideoViT  # pylint: disable=g-import-not-at-top
  meta, flat = read_export(path)
  config = config_from_metadata(meta, compute_dtype)
  video = {k: v for k, v in flat.items() if k.startswith("video/")}
  module = _load_into(lambda: VideoViT(config, rngs=nnx.Rngs(0)), video, "video/", path)
  return VideoEncoder(module, config, meta)


class TVTSModel:
  """A loaded whole model (`--export_full`): the NNX module, its config, and its tokenizer.

  Attributes:
    module: the `tvts.TVTS` module (parameters inside).
    config: the model config stored in the export.
    tokenizer: the tokenizer exported beside the file (`data_pipelines.tokenizer.Tokenizer`),
      or None for a file exported without one (then `embed_text` needs token ids).
    metadata: the export's metadata.
  """

  def __init__(self, module, config: ml_collections.ConfigDict, metadata: Mapping[str, Any],
               tokenizer=None):
    self.module, self.config, self.metadata, self.tokenizer = (module, config, dict(metadata),
                                                               tokenizer)
    graphdef, self.params = nnx.split(module)
    self._video = jax.jit(lambda p, v: nnx.merge(graphdef, p).video(v)[:, 0])
    self._video_emb = jax.jit(lambda p, c: nnx.merge(graphdef, p).video_embedding(c))
    self._text = jax.jit(lambda p, i, m: nnx.merge(graphdef, p).encode_text(i, m))
    self._text_emb = jax.jit(lambda p, f: nnx.merge(graphdef, p).text_embedding(f))

  def __iter__(self):
    """`module, config = load_model(path)`, as before this class existed."""
    return iter((self.module, self.config))

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [N, data.text_len] with the exported tokenizer."""
    if self.tokenizer is None:
      raise ExportError("this export has no tokenizer beside it (exported before tokenizers "
                        "were written, or without data.tokenizer): tokenize the texts yourself "
                        "and call text_features_from_ids")
    return self.tokenizer.encode(list(texts), int(self.config.data.text_len))

  def video_features(self, video: Any) -> jax.Array:
    """float32 [B, D]: the video tower's CLS token, every patch kept (uint8 [B, T, H, W, 3])."""
    return self._video(self.params, video)

  def embed_video(self, video: Any) -> jax.Array:
    """float32 [B, E]: L2-normalised contrastive embeddings of videos."""
    return self._video_emb(self.params, self.video_features(video))

  def text_features_from_ids(self, ids: Any, mask: Any) -> jax.Array:
    """float32 [N, Dt]: the text tower's feature of each tokenized text ([N, L] ids, mask)."""
    return self._text(self.params, jnp.asarray(ids)[:, None], jnp.asarray(mask)[:, None])[:, 0]

  def text_features(self, texts: Sequence[str]) -> jax.Array:
    """float32 [N, Dt]: the text tower's feature of each text."""
    return self.text_features_from_ids(*self.tokenize(texts))

  def embed_text(self, texts: Sequence[str]) -> jax.Array:
    """float32 [N, E]: L2-normalised contrastive embeddings, each text a one-transcript query
    (compare with `embed_video` by a dot product)."""
    return self._text_emb(self.params, self.text_features(texts)[:, None])


def load_model(path: str, *, compute_dtype: str | None = None) -> TVTSModel:
  """Loads a `full` export: towers, sorter, projections, and the tokenizer exported beside it.

  Args:
    path: a `.safetensors` or `.npz` file written with `--export_full`.
    compute_dtype: override the stored compute dtype.

  Returns:
    A `TVTSModel`: `.module` (a `tvts.TVTS`), `.config`, `.tokenizer`, `embed_video`,
    `embed_text`. It also unpacks as `module, config = load_model(path)`.

  Raises:
    ExportError: the file holds the video encoder only, or does not match its config.
  """
  from tvts_jax.models import tvts  # pylint: disable=g-import-not-at-top
  meta, flat = read_export(path)
  if meta["contents"] != "full":
    raise ExportError(f"{path} holds the video encoder only; export with --export_full for "
                      "the whole model, or use load_video_encoder")
  config = config_from_metadata(meta, compute_dtype)
  module = _load_into(lambda: tvts.TVTS(config, rngs=nnx.Rngs(0)), flat, "", path)
  tokenizer = None
  if meta.get("tokenizer"):
    from data_pipelines import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    tok_path = os.path.join(os.path.dirname(os.path.abspath(path)), meta["tokenizer"])
    if not os.path.exists(tok_path):
      raise ExportError(f"{path}: its tokenizer {tok_path} is missing (copy it with the file)")
    tokenizer = tok_lib.load(tok_path)
  return TVTSModel(module, config, meta, tokenizer)
