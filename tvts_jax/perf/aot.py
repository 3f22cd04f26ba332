"""Compiling the train step for a GPU this machine does not have.

XLA:GPU can compile ahead of time from a description of the target ("deviceless"): the
compiled step's memory analysis is then XLA:GPU's own buffer assignment for that card, so a
config's memory and the largest batch that fits can be known before renting the card
(`python -m tvts_jax.perf --aot_target=h100 [--find_max_batch]`). Nothing runs: there is
no step time and no FLOP count (XLA reports no cost analysis for such executables).

Needs jax's CUDA plugin (`pip install jax-cuda12-plugin==<jax version> nvidia-cudnn-cu12`, or
jax-cuda13-plugin with nvidia-cudnn-cu13; no GPU, driver or CUDA toolkit).
`configure_environment` must run before JAX starts its backends: it lets the plugin load
without a driver and turns off what needs a device at compile time (GEMM autotuning, Triton
GEMMs), which changes kernels, not buffer sizes (on an H200 the card's own memory estimate of
the paper step equalled the deviceless one to the byte).
"""

from __future__ import annotations

import importlib.util
import os

import jax

from tvts_jax import optim, sharding, train
from tvts_jax.models import platform

_GPU_INFO = """
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""

# Target name -> (device_description_str, device memory bytes, memory bandwidth bytes/s).
TARGETS = {
    "h100": ("NVIDIA H100 80GB HBM3", 84_929_347_584, 3_352_320_000_000),
    "h200": ("NVIDIA H200", 150_754_820_096, 4_800_000_000_000),
}

# The share of a GPU's memory JAX's allocator takes by default (XLA_PYTHON_CLIENT_MEM_FRACTION):
# what `memory_stats()['bytes_limit']` reports on the card, so the limit a real run has.
DEFAULT_MEM_FRACTION = 0.75


def cuda_plugin_installed() -> bool:
  """Whether jax's CUDA plugin (CUDA 12 or 13 build) is importable: what this module needs."""
  return any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))


def configure_environment() -> None:
  """Sets what a deviceless CUDA compile needs; call before JAX initialises its backends."""
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0"):
    if flag.split("=")[0] not in flags:
      flags += " " + flag
  os.environ["XLA_FLAGS"] = flags.strip()


def target_config(target: str) -> str:
  """The GpuTargetConfig text XLA:GPU compiles against, for a name in TARGETS."""
  if target not in TARGETS:
    raise ValueError(f"unknown --aot_target {target!r}; known: {sorted(TARGETS)}")
  name, memory, bandwidth = TARGETS[target]
  return _GPU_INFO.format(name=name, memory=memory, bandwidth=bandwidth)


def memory_limit(target: str) -> int:
  """Bytes JAX's allocator may use on one such card (as `memory_stats()['bytes_limit']`)."""
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
  return int(TARGETS[target][1] * fraction)


class AotTrainer:
  """What `step.compile_step` / `step.find_max_batch` use of a `train.Trainer`, for a target
  GPU: the (data, fsdp) mesh over `num_devices` such cards, abstract sharded state and the
  jitted step. No state is created (the devices do not exist). Creating one switches the
  process to building the model for CUDA (`platform.set_target_platform`): a process that
  compiles for a target GPU does nothing else."""

  def __init__(self, config, target: str, num_devices: int = 1):
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    try:
      topology = topologies.get_topology_desc(
          platform="cuda", target_config=target_config(target),
          topology=f"1x1x{num_devices}")
    except (NotImplementedError, RuntimeError) as e:
      raise RuntimeError(
          "compiling for a GPU without one needs jax's CUDA plugin (pip install "
          f"jax-cuda12-plugin=={jax.__version__} nvidia-cudnn-cu12, or the cuda13 pair) and "
          "aot.configure_environment() before JAX starts: " + str(e)) from e
    # Build and trace the model as for that GPU (bf16 activations, cuDNN attention allowed).
    platform.set_target_platform("cuda")
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, devices=topology.devices)
    self.tx = optim.make_optimizer(config)
    self._abstract_state, self.state_shardings, self.graphdef = train.abstract_train_state(
        config, self.mesh, self.tx)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self._train_step = train.jit_train_step(config, self.mesh, self.graphdef, self.tx,
                                            self.state_shardings)

  def abstract_state(self):
    return self._abstract_state
