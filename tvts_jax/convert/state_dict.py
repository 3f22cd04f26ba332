"""Reading foreign (PyTorch) state dicts and mapping timm-layout pieces onto our parameters.

Shared by `convert.mae` and `convert.tvts_torch`. Reading never unpickles arbitrary code:
`.safetensors` files are read with `safetensors.numpy`; `.pth` / `.pt` / `.bin` files with
`torch.load(..., weights_only=True)`, which refuses any pickled object that is not a tensor or a
plain container. torch is imported only here, lazily, and only for those extensions.

`StateDict` wraps the flat `{key: np.ndarray}` dict and records which keys a converter used, so
that after a conversion every key is accounted for: used, deliberately skipped (reported), or an
error that names it.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"


class ConversionError(ValueError):
  """A foreign checkpoint that does not map onto this config: names the offending key."""


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor or numpy array -> float32/int numpy (bf16/fp16 upcast to float32)."""
  if isinstance(value, np.ndarray):
    return value
  # A torch.Tensor (checked by duck type, so torch is not imported for safetensors files).
  value = value.detach().cpu()
  if value.is_floating_point():
    value = value.float()
  return value.numpy()


def _is_tensor_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items())


def _load_torch(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs PyTorch (`pip install 'tvts-jax[torch]'`), or convert the file to "
        ".safetensors first (safetensors.torch.save_file(state_dict, 'x.safetensors'))") from e
  try:
    with open(path, "rb") as f:
      return torch.load(f, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ConversionError(
        f"{path}: torch's weights-only loader refused it, because it pickles objects other "
        "than tensors (e.g. a training config or optimizer object). tvts-jax never unpickles "
        "arbitrary code. In an environment you trust, save the weights alone and convert "
        "that: `ck = torch.load(PATH, weights_only=False); "
        "torch.save({'state_dict': ck['state_dict']}, 'weights.pth')` (or 'model' for MAE), "
        f"or safetensors.torch.save_file(...). Loader message: {str(e).splitlines()[0]}"
    ) from e


def load_state_dict(path: str, nested_keys: Iterable[str] = ("model", "state_dict")
                    ) -> dict[str, np.ndarray]:
  """Reads a flat `{key: array}` state dict from a safetensors or PyTorch file.

  Args:
    path: a `.safetensors` file, or a `.pth`/`.pt`/`.bin`/`.ckpt` PyTorch file.
    nested_keys: if the file holds a dict whose value under one of these keys is the state dict
      (MAE: `model`; the reference TVTS trainer: `state_dict`), that value is used; other
      top-level entries (epoch, optimizer state, ...) are ignored.

  Returns:
    `{key: np.ndarray}`, floating arrays as float32.

  Raises:
    FileNotFoundError: no such file.
    ConversionError: an unknown extension, a file that is not a state dict, or a pickle that
      the weights-only loader refuses.
    ImportError: a PyTorch file without torch installed.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if path.endswith(SAFETENSORS_SUFFIX):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    try:
      obj = st_numpy.load_file(path)
    except SafetensorError as e:
      raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
  elif path.endswith(TORCH_SUFFIXES):
    obj = _load_torch(path)
  else:
    raise ConversionError(f"{path}: unknown checkpoint format; expected {SAFETENSORS_SUFFIX} "
                          f"or one of {TORCH_SUFFIXES}")
  if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
    for key in nested_keys:
      if key in obj and _is_tensor_dict(obj[key]):
        obj = obj[key]
        break
  if not _is_tensor_dict(obj):
    top = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(f"{path}: no state dict found (top level: {top}; looked under "
                          f"{list(nested_keys)})")
  return {k: _to_numpy(v) for k, v in obj.items()}


@dataclasses.dataclass
class Report:
  """What a conversion did, for the log and for tests.

  Attributes:
    mapped: foreign key -> our parameter path, for every foreign tensor used.
    skipped: prefix -> foreign keys deliberately not converted (e.g. the DistilBERT text model).
    kept_init: our parameter paths the checkpoint does not provide (they keep their init).
    notes: resizes and other transformations worth a log line.
  """
  mapped: dict[str, str] = dataclasses.field(default_factory=dict)
  skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  kept_init: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"{len(self.mapped)} tensors converted"]
    for prefix, keys in self.skipped.items():
      lines.append(f"{len(keys)} tensors under {prefix!r} not converted (by design)")
    if self.kept_init:
      lines.append(f"{len(self.kept_init)} of our parameters keep their initialisation: "
                   f"{abbreviate(self.kept_init)}")
    lines.extend(self.notes)
    return "; ".join(lines)


def abbreviate(paths: list[str], limit: int = 6) -> str:
  """Parameter paths by their first two levels, for a log line."""
  heads = sorted({"/".join(p.split("/")[:2]) for p in paths})
  more = f", ... ({len(heads)} groups)" if len(heads) > limit else ""
  return ", ".join(heads[:limit]) + more


class StateDict:
  """A flat foreign state dict that remembers which keys were used.

  Attributes:
    source: the file it came from (named in every error).
    report: what has been mapped and skipped so far.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
    self._tensors = dict(tensors)
    self._used: set[str] = set()
    self.source = source
    self.report = Report()

  def keys(self) -> list[str]:
    return list(self._tensors)

  def __contains__(self, key: str) -> bool:
    return key in self._tensors

  def take(self, key: str, ours: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Returns the tensor under `key` and records that it maps onto our path `ours`.

    Args:
      key: the foreign key.
      ours: our parameter path it becomes (for the report and error messages).
      shape: if given, the foreign shape required.

    Raises:
      ConversionError: the key is missing, or its shape differs from `shape`.
    """
    if key not in self._tensors:
      raise ConversionError(f"{self.source}: missing key {key!r} (needed for our {ours})")
    value = self._tensors[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConversionError(f"{self.source}: {key!r} has shape {tuple(value.shape)}, this "
                            f"config needs {tuple(shape)} for our {ours}")
    self._used.add(key)
    self.report.mapped[key] = ours
    return value

  def count_indexed(self, prefix: str) -> int:
    """Number of consecutive `prefix{i}.` groups (e.g. blocks) present from i = 0."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in self._tensors for m in [pattern.match(k)] if m}
    n = 0
    while n in indices:
      n += 1
    return n

  def skip_prefix(self, prefix: str) -> None:
    """Marks every key under `prefix` as deliberately not converted (reported, not an error)."""
    keys = sorted(k for k in self._tensors if k.startswith(prefix) and k not in self._used)
    if keys:
      self.report.skipped[prefix] = keys
      self._used.update(keys)

  def check_all_used(self) -> None:
    """Raises if a key was neither used nor skipped: it would otherwise be silently dropped."""
    unused = sorted(set(self._tensors) - self._used)
    if unused:
      raise ConversionError(
          f"{self.source}: {len(unused)} unexpected key(s) that nothing maps: "
          f"{unused[:8]}{' ...' if len(unused) > 8 else ''} (a different architecture, or a "
          "depth / option this config does not have?)")


# ---------------------------------------------------------------------------------------------
# timm-layout pieces. PyTorch Linear weights are [out, in]; our kernels are [in, out].


def linear(sd: StateDict, key: str, ours: str, in_features: int, out_features: int,
           bias: bool = True) -> dict[str, np.ndarray]:
  """`key.weight` [out, in] (+ `key.bias`) -> {kernel [in, out], bias [out]}."""
  out = {"kernel": sd.take(f"{key}.weight", f"{ours}/kernel", (out_features, in_features)).T}
  if bias:
    out["bias"] = sd.take(f"{key}.bias", f"{ours}/bias", (out_features,))
  return out


def layer_norm(sd: StateDict, key: str, ours: str, width: int) -> dict[str, np.ndarray]:
  """`key.weight`, `key.bias` -> {scale, bias}."""
  return {"scale": sd.take(f"{key}.weight", f"{ours}/scale", (width,)),
          "bias": sd.take(f"{key}.bias", f"{ours}/bias", (width,))}


# The weights file of a Hugging Face model folder, in the order they are looked for.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_weights_file(path: str) -> str:
  """The weights file of a Hugging Face model folder (or `path` itself when it is a file)."""
  if not os.path.isdir(path):
    return path
  for name in HF_WEIGHT_FILES:
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name)
  raise FileNotFoundError(f"{path}: no {' or '.join(HF_WEIGHT_FILES)} in this folder")


def fused_qkv(sd: StateDict, keys: tuple[str, str, str], ours: str,
              width: int) -> dict[str, np.ndarray]:
  """Separate q, k, v Linears ([D, D] weights, as Hugging Face models keep them) -> our fused
  qkv {kernel [D, 3D], bias [3D]}: the three kernels side by side, q|k|v, each (head, head_dim)
  as those models split them."""
  parts = [linear(sd, key, f"{ours}[{name}]", width, width) for key, name in zip(keys, "qkv")]
  return {"kernel": np.concatenate([p["kernel"] for p in parts], axis=1),
          "bias": np.concatenate([p["bias"] for p in parts])}


def block(sd: StateDict, key: str, ours: str, width: int, mlp_dim: int) -> dict[str, Any]:
  """One timm ViT block (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) -> our Block.

  The fused qkv weight [3D, D] has output rows ordered (q|k|v, head, head_dim) in timm, in MAE
  and in the reference's sorter (`chunk(3)` then heads), which is our kernel's column order
  after the transpose: no reordering.
  """
  return {
      "norm1": layer_norm(sd, f"{key}.norm1", f"{ours}/norm1", width),
      "attn": {"qkv": linear(sd, f"{key}.attn.qkv", f"{ours}/attn/qkv", width, 3 * width),
               "proj": linear(sd, f"{key}.attn.proj", f"{ours}/attn/proj", width, width)},
      "norm2": layer_norm(sd, f"{key}.norm2", f"{ours}/norm2", width),
      "mlp": {"fc1": linear(sd, f"{key}.mlp.fc1", f"{ours}/mlp/fc1", width, mlp_dim),
              "fc2": linear(sd, f"{key}.mlp.fc2", f"{ours}/mlp/fc2", mlp_dim, width)},
  }


def separate_qkv_block(names: dict[str, str]):
  """A `block_fn` of `blocks` for Hugging Face encoder layers with separate q, k, v Linears.

  Args:
    names: the layer's module names of our norm1, q, k, v, out, norm2, fc1 and fc2 (the norms
      in our Block's places: pre-LN towers read them before, post-LN ones after).
  """
  def convert(sd: StateDict, key: str, ours: str, width: int, mlp_dim: int) -> dict[str, Any]:
    n = {part: f"{key}.{name}" for part, name in names.items()}
    return {
        "norm1": layer_norm(sd, n["norm1"], f"{ours}/norm1", width),
        "attn": {"qkv": fused_qkv(sd, (n["q"], n["k"], n["v"]), f"{ours}/attn/qkv", width),
                 "proj": linear(sd, n["out"], f"{ours}/attn/proj", width, width)},
        "norm2": layer_norm(sd, n["norm2"], f"{ours}/norm2", width),
        "mlp": {"fc1": linear(sd, n["fc1"], f"{ours}/mlp/fc1", width, mlp_dim),
                "fc2": linear(sd, n["fc2"], f"{ours}/mlp/fc2", mlp_dim, width)},
    }
  return convert


def blocks(sd: StateDict, key: str, ours: str, depth: int, width: int, mlp_dim: int,
           block_fn=block) -> dict[str, Any]:
  """`key.0.*` ... `key.{depth-1}.*` -> our BlockStack {'layers': {i: block}} (list layout),
  each block mapped by `block_fn` (default: a timm ViT block).

  Raises:
    ConversionError: the checkpoint has a different number of blocks than `depth`.
  """
  found = sd.count_indexed(f"{key}.")
  if found != depth:
    raise ConversionError(f"{sd.source}: {found} blocks under {key + '.'!r}, this config "
                          f"builds {depth} ({ours}); set the matching depth")
  return {"layers": {i: block_fn(sd, f"{key}.{i}", f"{ours}/layers/{i}", width, mlp_dim)
                     for i in range(depth)}}


def resize_pos_embed(pos: np.ndarray, num_patches: int, num_prefix: int = 1) -> np.ndarray:
  """Resamples a [1, prefix + g*g, D] position embedding to [1, prefix + num_patches, D].

  The prefix slots (CLS) are kept; the g x g grid is resized bicubically to the new square grid,
  as MAE / timm do when fine-tuning at another resolution. (jax.image.resize's cubic kernel is
  Keys' a=-0.5; PyTorch's bicubic uses a=-0.75: values differ slightly from timm's resample.)

  Args:
    pos: [1, prefix + g*g, D].
    num_patches: target number of grid positions (a perfect square).
    num_prefix: leading non-grid slots.

  Returns:
    float32 [1, prefix + num_patches, D]; `pos` itself when the grid already matches.
  """
  import jax  # pylint: disable=g-import-not-at-top
  prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
  old, new = int(round(grid.shape[1] ** 0.5)), int(round(num_patches ** 0.5))
  if old * old != grid.shape[1] or new * new != num_patches:
    raise ConversionError(f"position embedding grid {grid.shape[1]} -> {num_patches}: both "
                          "must be square grids")
  if old == new:
    return pos
  d = grid.shape[-1]
  resized = jax.image.resize(grid.reshape(old, old, d).astype(np.float32), (new, new, d),
                             method="cubic", antialias=False)
  return np.concatenate([prefix, np.asarray(resized).reshape(1, new * new, d)], axis=1)


def pos_embed(sd: StateDict, key: str, ours: str, width: int, num_patches: int) -> np.ndarray:
  """Takes a [1, 1 + grid, width] position embedding and resizes its grid to `num_patches`.

  A resize is noted in the conversion report.

  Raises:
    ConversionError: the tensor is not [1, 1 + grid, width].
  """
  pos = sd.take(key, ours)
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width:
    raise ConversionError(f"{sd.source}: {key!r} has shape {pos.shape}, expected "
                          f"[1, 1 + grid, {width}]")
  resized = resize_pos_embed(pos, num_patches)
  if resized is not pos:
    sd.report.notes.append(f"pos_embed grid resized {pos.shape[1] - 1} -> {num_patches} patches")
  return resized
