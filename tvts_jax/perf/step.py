"""The trainer's real step on synthetic batches: compiling it, the largest batch that fits,
and timing it.

What runs is the trainer's own step (`train.Trainer`: the sharded state, the jitted step with
the state donated) on synthetic batches of the config's shapes, placed on the devices once so
that the timing is the step alone. Nothing here imports TensorFlow: the step can be timed in a
JAX-only environment.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from tvts_jax import sharding
from tvts_jax.models import platform
from tvts_jax.perf import flops, hlo


def synthetic_batch(config: ml_collections.ConfigDict, batch_size: int,
                    text_len: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
  """This host's slice of a random batch with the shapes and dtypes the trainer consumes.

  Args:
    config: the run config (data shapes, vocabulary).
    batch_size: the GLOBAL batch; this host gets batch_size // process_count examples.
    text_len: transcript length L (default config.data.text_len).
    seed: numpy seed.

  Returns:
    dict of numpy arrays: video uint8 [b,T,H,W,3], text_ids int32 [b,K,L], text_mask bool
    [b,K,L] (every token real: the step costs the same whatever the padding), order int32
    [b,K] (random permutations), valid bool [b] (all True).
  """
  d = config.data
  length = d.text_len if text_len is None else text_len
  b = batch_size // jax.process_count()
  rng = np.random.default_rng([seed, jax.process_index()])
  return {
      "video": rng.integers(0, 256, (b, d.num_frames, d.image_size, d.image_size, 3),
                            dtype=np.uint8),
      "text_ids": rng.integers(1, config.model.text.vocab_size, (b, d.num_clips, length),
                               dtype=np.int32),
      "text_mask": np.ones((b, d.num_clips, length), bool),
      "order": np.stack([rng.permutation(d.num_clips) for _ in range(b)]).astype(np.int32),
      "valid": np.ones((b,), bool),
  }


def _abstract_batch(trainer, config, batch_size: int, text_len: int | None):
  local = jax.eval_shape(lambda: synthetic_batch(config, batch_size, text_len))
  shape = lambda x: (batch_size,) + tuple(x.shape[1:])  # global shapes
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(shape(x), x.dtype, sharding=trainer.batch_sharding),
      local)


def _step_fn(trainer):
  # The trainer's jitted, state-donating step: benchmarking anything else would measure a
  # different program. (`Trainer.step` adds the host-to-device copy of the batch.)
  return trainer._train_step  # pylint: disable=protected-access


def compile_step(trainer, config, batch_size: int, text_len: int | None):
  """Lowers and compiles the trainer's step for a batch shape, allocating nothing.

  Returns:
    (compiled, lower_seconds, compile_seconds, lowered).
  """
  t0 = time.perf_counter()
  lowered = _step_fn(trainer).lower(trainer.abstract_state(),
                                    _abstract_batch(trainer, config, batch_size, text_len))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1, lowered


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def find_max_batch(trainer, config, text_len: int | None = None, *,
                   limit_bytes: int, fraction: float = 0.9, max_batch: int = 1 << 14,
                   multiple: int = 1, compiled: dict[int, Any] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """The largest global batch whose compiled step fits `fraction` of a device's memory.

  Doubles the batch from config.batch_size while it fits, then bisects between the last batch
  that fits and the first that does not (halving first if config.batch_size itself does not
  fit). Batches are multiples of the device count and of `multiple` (fewer compiles on a large
  device: each costs a full compile of the step). Only compiles: XLA's memory analysis of
  each candidate (`hlo.memory_analysis(...)['estimate']`, per device) is compared with the
  limit, so nothing is allocated and an oversized batch cannot crash the search.

  Args:
    trainer: a `train.Trainer` (its state is not touched).
    config: the run config.
    text_len: transcript length.
    limit_bytes: memory of one device.
    fraction: share of `limit_bytes` a batch may use (headroom for fragmentation and the
      runtime's own buffers).
    max_batch: stop doubling here.
    multiple: the search's resolution; batches tried are multiples of lcm(device count,
      multiple).
    compiled: if given, receives {max_batch: compile_step's result} (the step already
      compiled at the answer, for `benchmark_step(precompiled=...)`).
    log: progress printer.

  Returns:
    dict(max_batch (0 if none fits), per_device, estimate_bytes (of max_batch), limit_bytes,
    fraction, tried: list of [batch, estimate bytes or null, fits]).
  """
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}")
  unit = math.lcm(trainer.mesh.size, multiple)
  tried: dict[int, tuple[int | None, bool]] = {}

  def fits(batch: int) -> bool:
    if batch not in tried:
      try:
        result = compile_step(trainer, config, batch, text_len)
        executable, _, seconds, _ = result
        mem = hlo.memory_analysis(executable)
        estimate = None if mem is None else mem["estimate"]
        ok = estimate is not None and estimate <= fraction * limit_bytes
        if ok and compiled is not None and batch > max(compiled, default=0):
          compiled.clear()  # keep only the largest batch that fits: an executable is large
          compiled[batch] = result
      except jax.errors.JaxRuntimeError as e:  # the compiler itself ran out of memory
        if not _is_oom(e):
          raise
        estimate, ok, seconds = None, False, 0.0
      tried[batch] = (estimate, ok)
      log(f"  batch {batch:6d}: {'fits' if ok else 'does not fit'} "
          f"({(estimate or 0) / 2**30:.2f} GiB per device; limit "
          f"{fraction * limit_bytes / 2**30:.2f} GiB; compiled in {seconds:.1f} s)")
    return tried[batch][1]

  start = max(unit, config.batch_size // unit * unit)
  if fits(start):
    lo, hi = start, None
    while hi is None:
      if lo * 2 > max_batch:
        hi = lo  # capped: report the cap as the answer
      elif fits(lo * 2):
        lo *= 2
      else:
        hi = lo * 2
  else:
    lo, hi = 0, start
    while hi > unit:
      candidate = max(unit, hi // 2 // unit * unit)
      if fits(candidate):
        lo = candidate
        break
      hi = candidate
  while hi - lo > unit:
    mid = (lo + hi) // 2 // unit * unit
    if mid <= lo:
      break
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return dict(max_batch=lo, per_device=lo // trainer.mesh.size,
              estimate_bytes=tried[lo][0] if lo else None, limit_bytes=limit_bytes,
              fraction=fraction,
              tried=[[b, est, ok] for b, (est, ok) in sorted(tried.items())])


def run_settings(config, text_len: int | None) -> dict[str, Any]:
  """The settings a report names its run by (beside the batch and the device)."""
  return {
      "text_len": config.data.text_len if text_len is None else text_len,
      "compute_dtype": config.compute_dtype,
      "remat": config.model.remat,
      "scan_layers": bool(config.model.scan_layers),
      "attention": platform.resolve_attention(config),  # 'auto' as resolved on this platform
  }


def median(xs: list[float]) -> float:
  """The median of a list of step times; NaN for an empty one."""
  return float(statistics.median(xs)) if xs else float("nan")


# --compare_torch: steps per block, alternating with the PyTorch model's blocks.
SIDE_BY_SIDE_BLOCK = 5


def benchmark_step(trainer, config, *, steps: int, warmup: int, text_len: int | None = None,
                   batch_size: int | None = None, dump_hlo: str = "", profile_dir: str = "",
                   other: Callable[[int], Any] | None = None,
                   block: int = SIDE_BY_SIDE_BLOCK,
                   precompiled: tuple | None = None) -> dict[str, Any]:
  """Compiles and times the trainer's step on one synthetic batch.

  The batch is placed on the devices once; each timed step waits for the new state and the
  metrics (`block_until_ready`), so a step's time is its whole device time plus dispatch.

  Args:
    trainer: a `train.Trainer` (its state is stepped).
    config: the run config.
    steps: timed steps (the median is reported).
    warmup: untimed steps first.
    text_len: transcript length (default config.data.text_len).
    batch_size: global batch (default config.batch_size).
    dump_hlo: write the optimised HLO text here.
    profile_dir: write a `jax.profiler` trace of the timed steps here.
    other: side-by-side timing (`--compare_torch`): the timed steps run in blocks of `block`,
      each after one untimed step, and `other(n)` is called after each block of n steps
      (it runs the other implementation's block, `torch_ref.SideBySide.run`).
    block: steps per block with `other`.
    precompiled: `compile_step`'s result for this batch where the caller compiled it already
      (the memory check before allocating): reused, and its compile time reported.

  Returns:
    The report dict (its keys: the docstring of `tvts_jax/perf/__main__.py`), without the
    input-pipeline keys.
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  sharding.check_batch_size(batch_size, trainer.mesh)
  compiled, lower_s, compile_s, lowered = (
      precompiled or compile_step(trainer, config, batch_size, text_len))
  hlo_text = compiled.as_text()
  if dump_hlo:
    with open(dump_hlo, "w") as f:
      f.write(hlo_text)
  stats = hlo.hlo_stats(hlo_text)
  stats["lowered"] = hlo.lowered_stats(lowered.as_text())
  mem = hlo.memory_analysis(compiled)
  devices = trainer.mesh.devices.flatten().tolist()
  xla_flops = hlo.cost_flops(compiled)
  # The compiled module is one device's share of the SPMD program.
  xla_flops_total = None if xla_flops is None else xla_flops * len(devices)
  analytic = flops.analytic_flops(config, batch_size, text_len)

  batch = sharding.global_batch(synthetic_batch(config, batch_size, text_len), trainer.mesh)
  times, metrics = [], {}

  def timed_step():
    nonlocal metrics
    t0 = time.perf_counter()
    # The executable compiled above (the trainer's jitted step, state donated): no tracing
    # or cache lookups inside the timed region.
    trainer.state, metrics = compiled(trainer.state, batch)
    jax.block_until_ready((trainer.state, metrics))
    return time.perf_counter() - t0

  for _ in range(warmup):
    timed_step()
  if profile_dir:
    jax.profiler.start_trace(profile_dir)
  while len(times) < steps:
    n = min(block, steps - len(times)) if other else steps
    if other:
      timed_step()  # untimed: the other process's threads go quiet
    times += [timed_step() for _ in range(n)]
    if other:
      other(n)
  if profile_dir:
    jax.profiler.stop_trace()

  step_time = median(times)
  kind = devices[0].device_kind
  peak = flops.peak_flops_per_device(kind)
  stats_now = [hlo.memory_stats(d) for d in jax.local_devices()]
  peaks = [s["peak_bytes_in_use"] for s in stats_now if s and "peak_bytes_in_use" in s]
  state_bytes = sum(shard.data.nbytes for x in jax.tree.leaves(trainer.state)
                    for shard in x.addressable_shards if shard.device == devices[0])
  report = {
      "step_time_s": step_time,
      "clips_per_s": batch_size / step_time,
      "flops_per_step": xla_flops_total,
      "flops_per_step_analytic": analytic["total"],
      "tflops_per_s": None if xla_flops_total is None else xla_flops_total / step_time / 1e12,
      "model_tflops_per_s": analytic["total"] / step_time / 1e12,
      "mfu": flops.mfu(analytic["total"], step_time, len(devices), peak),
      "peak_flops_per_device": peak,
      "peak_memory_bytes": max(peaks) if peaks else (mem or {}).get("estimate"),
      "peak_memory_source": "device.memory_stats" if peaks else "compiled.memory_analysis",
      "compile_time_s": lower_s + compile_s,
      "lower_time_s": lower_s,
      "device": f"{kind} x{len(devices)}",
      "platform": devices[0].platform,
      "batch_size": batch_size,
      "per_device_batch": batch_size // len(devices),
      **run_settings(config, text_len),
      "steps": steps,
      "step_times_s": times,
      "loss": float(metrics["loss"]) if "loss" in metrics else None,
      "flops_analytic_parts": {k: v for k, v in analytic.items() if k != "total"},
      "memory": mem,
      "state_bytes_per_device": int(state_bytes),
      "device_memory_limit_bytes": hlo.device_memory_limit(devices[0]),
      "hlo": stats,
  }
  if stats["while_loops"]:
    report["flops_note"] = ("the step has while loops (scan_layers): XLA's cost analysis "
                            "counts a loop body once, so flops_per_step and tflops_per_s are "
                            "low; use flops_per_step_analytic / model_tflops_per_s")
  elif xla_flops_total is not None and xla_flops_total < 0.5 * analytic["total"]:
    report["flops_note"] = ("XLA's cost analysis counts no library calls (on GPU the matmuls "
                            "run in cuBLAS and fused attention in cuDNN), so flops_per_step "
                            "and tflops_per_s are low; use flops_per_step_analytic / "
                            "model_tflops_per_s")
  return report

