"""Which platform the model is built for, and the choices that depend on it.

The model is built for the default backend, or for a target set with `set_target_platform`
(ahead-of-time compiles for a GPU this machine lacks, `tvts_jax/perf/aot.py`). Two choices key
on it: the attention kernel (`resolve_attention`: cuDNN's fused attention on NVIDIA GPUs, XLA's
elsewhere) and the dtype of the residual stream (`activation_dtype`: float32 on XLA:CPU when
the matmuls run in bfloat16).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tvts_jax import config_schema


# The platform the model is built for when it is not the default backend's: set by
# `set_target_platform` for ahead-of-time compiles for other hardware (tvts_jax/perf/aot.py).
_target_platform: str | None = None


def set_target_platform(target: str | None) -> None:
  """Builds the model for `platform` ('cpu' or 'cuda'; None: the default backend) from now on.

  For compiling for hardware this process does not drive (tvts_jax/perf/aot.py): the CPU-only and
  GPU-only choices below then follow the target, not the host.
  """
  global _target_platform
  if target not in (None, "cpu", "cuda"):
    raise ValueError(f"target platform {target!r}; must be None, 'cpu' or 'cuda'")
  _target_platform = target


def on_cpu() -> bool:
  """Whether the model is being built for XLA:CPU (the CPU-only choices below key on it)."""
  if _target_platform is not None:
    return _target_platform == "cpu"
  return jax.default_backend() == "cpu"


def on_cuda_gpu() -> bool:
  """Whether the model is being built for an NVIDIA GPU (where cuDNN attention exists)."""
  if _target_platform is not None:
    return _target_platform == "cuda"
  if jax.default_backend() != "gpu":
    return False
  return "cuda" in getattr(jax.devices()[0].client, "platform_version", "").lower()


def check_attention_backend(attention: str) -> None:
  """Raises ConfigError if `attention` cannot run on the platform the model is built for.

  'cudnn' needs an NVIDIA GPU; failing here names the config key instead of failing inside
  the compiler with a cuDNN message.
  """
  if attention == "cudnn" and not on_cuda_gpu():
    raise config_schema.ConfigError(
        f"model.attention='cudnn' needs an NVIDIA GPU, but the backend is "
        f"{jax.default_backend()!r}; use model.attention='auto' (the default: cuDNN on NVIDIA "
        "GPUs, XLA elsewhere) or 'xla' here (the parameters are the same, so a checkpoint "
        "trained with one loads with any)")


# What `Attention` and `BlockStack` take: `model.attention` after `resolve_attention`.
ATTENTION_KERNELS = ("xla", "cudnn")


def resolve_attention(config: Any) -> str:
  """The attention implementation a model of `config` is built with, 'xla' or 'cudnn'.

  `model.attention` as set, except 'auto': 'cudnn' when the model is built for an NVIDIA GPU
  and cuDNN can run it (`config_schema.cudnn_attention_problem`: bfloat16, head dimensions a
  multiple of 8 up to 128), else 'xla'. So a config or an export moves between a GPU and a CPU
  without edits, and a GPU run gets the fused kernel (faster, and it never stores the
  attention matrix: docs/benchmarks.md).
  """
  attention = config.model.attention
  if attention != "auto":
    return attention
  if on_cuda_gpu() and config_schema.cudnn_attention_problem(config) is None:
    return "cudnn"
  return "xla"


def activation_dtype(compute_dtype: Any) -> jnp.dtype:
  """The dtype of the residual stream and the elementwise work for a compute dtype.

  The compute dtype itself, except bfloat16 on XLA:CPU: there bfloat16 elementwise arithmetic
  is emulated (converted op by op, and bfloat16 reductions run as pairwise reduce-windows),
  slower than float32. So on CPU activations stay float32 and only the matmul operands are
  bfloat16 (`matmul.dense`), which is what a TPU does with float32 matmuls at default precision.
  """
  dtype = jnp.dtype(compute_dtype)
  if dtype == jnp.bfloat16 and on_cpu():
    return jnp.dtype(jnp.float32)
  return dtype
