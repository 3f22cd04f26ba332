"""tvts-jax: TVTS video pre-training (Turning to Video for Transcript Sorting) in JAX.

    import tvts_jax
    encoder = tvts_jax.load_video_encoder("encoder.safetensors")
    features = encoder.embed(video)   # uint8 [B, T, H, W, 3] -> float32 [B, D]

Importing the package is cheap: `load_video_encoder` and `load_model` import the exporter (and
with it JAX and Flax) on first use, and nothing here imports TensorFlow, orbax or the trainer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_video_encoder", "load_model"]


def load_video_encoder(path: str, **kwargs: Any):
  """Loads an exported video encoder; see `tvts_jax.export.load_video_encoder`."""
  from tvts_jax import export  # pylint: disable=g-import-not-at-top
  return export.load_video_encoder(path, **kwargs)


def load_model(path: str, **kwargs: Any):
  """Loads a whole exported TVTS model; see `tvts_jax.export.load_model`."""
  from tvts_jax import export  # pylint: disable=g-import-not-at-top
  return export.load_model(path, **kwargs)
