r"""Speed, FLOPs, MFU and memory of the real training step; input-pipeline throughput.

    python -m tvts_jax.benchmark --config=configs/small.py --steps=20
    python -m tvts_jax.benchmark --config=configs/paper.py --config.batch_size=2 --text_len=32
    python -m tvts_jax.benchmark --config=configs/paper.py --config.batch_size=24 \
        --config.compute_dtype=bfloat16 --find_max_batch          # on a GPU / TPU
    python -m tvts_jax.benchmark --config=configs/paper.py --config.batch_size=8 --input \
        [--records='DIR/train.tfrecord-*' --tokenizer=DIR/spm.model]

What it runs is the trainer's own step (`train.Trainer`: the sharded state, the jitted step with
the state donated) on synthetic batches of the config's shapes, placed on the devices once so
that the timing is the step alone. The last line printed is one JSON object; the keys are
documented in the README section "Benchmark". The important ones:

    step_time_s          median over --steps timed steps, after --warmup untimed ones
    clips_per_s          batch_size / step_time_s
    flops_per_step       XLA's cost analysis of the compiled step, all devices together
    flops_per_step_analytic   3 x the forward matmul FLOPs (`analytic_flops`)
    tflops_per_s         flops_per_step / step_time_s / 1e12
    mfu                  analytic FLOPs / step time / (devices x bf16 peak); null on CPU
    peak_memory_bytes    device.memory_stats() peak, or the compiled step's memory analysis
    compile_time_s       lowering + compiling the step

`--input` also measures the input pipeline alone on records (generated demo records at the
config's resolution when none are given) and the pipeline feeding the step, and says which of
the two limits. `--find_max_batch` searches the largest global batch whose compiled step fits
the device memory, from XLA's memory analysis (compiles only, so an oversized batch is a
number in the report, not an out-of-memory crash), then times the step at that batch.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import math
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from tvts_jax import config_schema, sharding
from tvts_jax.models import platform

# Dense (no sparsity) bf16 peak FLOP/s of one chip, from the vendors' spec sheets, keyed by a
# lower-case substring of `jax.Device.device_kind`. The first match wins, so the more specific
# names come first ("TPU v5 lite" is a v5e, a v5p reports "TPU v5").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("h200", 989e12),  # also GH200: the same Hopper SM count and clock
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM5
    ("a100", 312e12),
)

# Custom-call targets of fused attention kernels: cuDNN flash attention on GPU, Pallas/Mosaic
# kernels (splash, flash) on TPU.
_FUSED_ATTENTION = re.compile(r"fmha|flash|splash|attention|tpu_custom_call", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU.


def _block_flops(batch: int, seq: int, width: int, mlp_dim: int,
                 queries: int | None = None) -> int:
  """Forward matmul FLOPs of one pre-LN block (`layers.Block`) over `batch` sequences.

  Args:
    batch: number of sequences.
    seq: tokens per sequence (the keys and values).
    width: model width D (all heads together).
    mlp_dim: MLP hidden width M.
    queries: rows of the output that are used downstream (all `seq` when None): keys and
      values are needed for every token, everything else only for these rows.

  Returns:
    2 * multiply-adds: K/V projections 2*seq*2D^2, Q projection + output projection
    2*q*2D^2, MLP 2*q*2DM, attention scores and weighted values 2*2*q*seq*D.
  """
  q = seq if queries is None else queries
  kv = 2 * batch * seq * width * 2 * width
  rows = 2 * batch * q * (2 * width * width + 2 * width * mlp_dim)
  attention = 2 * 2 * batch * q * seq * width
  return kv + rows + attention


def analytic_flops(config: ml_collections.ConfigDict, batch_size: int,
                   text_len: int | None = None) -> dict[str, int]:
  """Matmul FLOPs of one training step, counted from the config.

  Counts the forward matmuls whose results reach the loss, and multiplies by 3 (backward =
  2 x forward: gradients of activations and of weights). Only what the loss reads is counted:
  the video tower on the kept tokens, the text tower's last block for the first (read-out)
  token only, the sorter's last block for the K transcript positions only (keys and values of
  every token are counted in both). Elementwise work (LayerNorm, GELU, softmax, AdamW) is
  not counted. The x3 slightly overcounts the patch embedding, which needs no input gradient.

  Args:
    config: a validated config.
    batch_size: global batch B.
    text_len: transcript length L (default config.data.text_len).

  Returns:
    FLOPs by part (forward, whole global batch): `patch_embed`, `video_blocks`, `text`,
    `sorter`, `heads` (contrastive projections and similarity, sorter input projection and
    output head), their sum `forward`, and `total` = 3 * forward.
  """
  v, t, s, d = config.model.video, config.model.text, config.model.sorter, config.data
  b, k = batch_size, d.num_clips
  length = d.text_len if text_len is None else text_len
  tubes = d.num_frames // v.tubelet
  kept = config_schema.num_kept_per_slice(config)
  video_tokens = 1 + tubes * kept
  e = config.model.embed_dim
  parts = {
      "patch_embed": 2 * b * tubes * kept * (v.tubelet * v.patch_size**2 * 3) * v.width,
      "video_blocks": v.depth * _block_flops(b, video_tokens, v.width, v.mlp_dim),
      "text": ((t.depth - 1) * _block_flops(b * k, length, t.width, t.mlp_dim)
               + _block_flops(b * k, length, t.width, t.mlp_dim, queries=1)),
      "sorter": ((s.depth - 1) * _block_flops(b, video_tokens + k, v.width, s.mlp_dim)
                 + _block_flops(b, video_tokens + k, v.width, s.mlp_dim, queries=k)),
      "heads": (2 * b * v.width * e  # video projection
                + 2 * b * k * t.width * e  # text projection
                + 2 * b * b * e  # contrastive similarity matrix
                + (2 * b * k * t.width * v.width if t.width != v.width else 0)  # sorter input
                + 2 * b * k * v.width * k),  # sorter head
  }
  parts = {name: int(x) for name, x in parts.items()}
  parts["forward"] = sum(parts.values())
  parts["total"] = 3 * parts["forward"]
  return parts


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device from `PEAK_BF16_FLOPS`; None if unknown (CPU)."""
  kind = device_kind.lower()
  for key, flops in PEAK_BF16_FLOPS:
    if key in kind:
      return flops
  return None


def mfu(flops_per_step: float, step_time_s: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all the devices used.

  Args:
    flops_per_step: model FLOPs of one global step (e.g. `analytic_flops(...)['total']`).
    step_time_s: seconds per step.
    num_devices: devices the step runs on.
    peak_per_device: peak FLOP/s of one device; None (unknown, CPU) gives None.

  Returns:
    A fraction in [0, 1] for a sane measurement, or None.
  """
  if peak_per_device is None or step_time_s <= 0:
    return None
  return flops_per_step / step_time_s / (num_devices * peak_per_device)


# ---------------------------------------------------------------------------------------------
# What the compiled step looks like.

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _dtype(type_str: str) -> str:
  m = _SHAPE.match(type_str)
  return m.group(1) if m else type_str


def _nbytes(type_str: str) -> int:
  m = _SHAPE.match(type_str)
  if not m:
    return 0
  dims = [int(x) for x in m.group(2).split(",") if x]
  return int(np.prod(dims, dtype=np.int64)) * _BYTES.get(m.group(1), 4)


def _operands(rest: str) -> list[str]:
  """Names of an instruction's operands (the text after `opcode(`)."""
  depth, args = 1, []
  for i, ch in enumerate(rest):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      args = rest[:i]
      break
  return re.findall(r"%([\w.\-]+)", args) if args else []


def hlo_stats(hlo_text: str) -> dict[str, Any]:
  """Counts what matters for speed in an optimised HLO module (`compiled.as_text()`).

  Instructions inside fusion bodies run fused (no memory round trip of their own), so copies
  and transposes are counted outside fusions, where each is a pass over memory.

  Args:
    hlo_text: the text of the compiled (optimised, per-device) module.

  Returns:
    A dict: `copies` and `copy_bytes` (unfused copy instructions), `state_copies` and
    `state_copy_bytes` (copies of an entry parameter: with a donated state these are a second
    copy of it), `transposes` (unfused), `transposes_in_fusions`, `dots` (by operand and
    result dtypes, fused or not, e.g. 'bf16,bf16->f32'), `exponentials` (by dtype: softmax
    and losses should stay f32), `gathers`, `scatters`, `collectives` (by opcode),
    `custom_calls` (by target), `fused_attention` (a fused attention kernel is called),
    `while_loops`, `instructions`.
  """
  lines = hlo_text.splitlines()
  types: dict[str, str] = {}
  fusion_bodies: set[str] = set()
  entry_params: set[str] = set()
  parsed = []
  computation, in_entry = "", False
  for line in lines:
    header = _COMPUTATION.match(line)
    if header:
      computation, in_entry = header.group(1), line.startswith("ENTRY")
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, type_str, opcode, rest = m.groups()
    types[name] = type_str
    if opcode == "fusion":
      fusion_bodies.update(re.findall(r"calls=%?([\w.\-]+)", rest))
    if opcode == "parameter" and in_entry:
      entry_params.add(name)
    parsed.append((computation, name, type_str, opcode, rest))

  counts = collections.Counter()
  dots, exps, collectives, custom_calls = (collections.Counter() for _ in range(4))
  copy_bytes = state_copy_bytes = 0
  for computation, name, type_str, opcode, rest in parsed:
    fused = computation in fusion_bodies
    counts["instructions"] += 1
    if opcode == "copy" and not fused:
      counts["copies"] += 1
      copy_bytes += _nbytes(type_str)
      if any(op in entry_params for op in _operands(rest)):
        counts["state_copies"] += 1
        state_copy_bytes += _nbytes(type_str)
    elif opcode == "transpose":
      counts["transposes_in_fusions" if fused else "transposes"] += 1
    elif opcode in ("dot", "convolution"):
      ops = [_dtype(types.get(op, "?")) for op in _operands(rest)[:2]]
      dots[f"{','.join(ops)}->{_dtype(type_str)}"] += 1
    elif opcode == "exponential":
      exps[_dtype(type_str)] += 1
    elif opcode in ("gather", "scatter"):
      counts[opcode + "s"] += 1
    elif opcode in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                    "collective-permute", "all-gather-start", "all-reduce-start",
                    "collective-permute-start"):
      collectives[opcode.replace("-start", "")] += 1
    elif opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', rest)
      custom_calls[target.group(1) if target else "?"] += 1
    elif opcode == "while":
      counts["while_loops"] += 1
  return {
      "instructions": counts["instructions"],
      "copies": counts["copies"],
      "copy_bytes": copy_bytes,
      "state_copies": counts["state_copies"],
      "state_copy_bytes": state_copy_bytes,
      "transposes": counts["transposes"],
      "transposes_in_fusions": counts["transposes_in_fusions"],
      "dots": dict(dots),
      "exponentials": dict(exps),
      "gathers": counts["gathers"],
      "scatters": counts["scatters"],
      "collectives": dict(collectives),
      "custom_calls": dict(custom_calls),
      "fused_attention": any(_FUSED_ATTENTION.search(t) for t in custom_calls),
      "while_loops": counts["while_loops"],
  }


_STABLEHLO_TENSOR = r"tensor<(?:[\d?]+x)*(\w+)>"
_STABLEHLO_DOT = re.compile(
    r"stablehlo\.(?:dot_general|dot|convolution)\b.*:\s*\(" + _STABLEHLO_TENSOR + r",\s*"
    + _STABLEHLO_TENSOR + r"\)\s*->\s*" + _STABLEHLO_TENSOR)
_STABLEHLO_EXP = re.compile(r"stablehlo\.exponential\b.*:\s*" + _STABLEHLO_TENSOR)


def lowered_stats(stablehlo_text: str) -> dict[str, dict[str, int]]:
  """Matmul and exp dtypes of the step as JAX wrote it, before the backend rewrites it.

  XLA:CPU runs bf16 matmuls in f32, so the compiled module of a bf16 config shows f32 dots
  on CPU; the lowered module shows what a GPU or TPU receives.

  Returns:
    `dots` by 'lhs,rhs->out' dtypes and `exponentials` by dtype.
  """
  dots, exps = collections.Counter(), collections.Counter()
  for line in stablehlo_text.splitlines():
    m = _STABLEHLO_DOT.search(line)
    if m:
      dots[f"{m.group(1)},{m.group(2)}->{m.group(3)}"] += 1
    m = _STABLEHLO_EXP.search(line)
    if m:
      exps[m.group(1)] += 1
  return {"dots": dict(dots), "exponentials": dict(exps)}


def memory_analysis(compiled) -> dict[str, int] | None:
  """Per-device bytes of a compiled executable, from XLA's buffer assignment.

  Returns:
    `argument`, `output`, `alias` (output bytes that reuse donated arguments), `temp`,
    `code`, and `estimate` = argument + output - alias + temp + code: what the step needs
    at its peak, its inputs included. None when the backend does not report it.
  """
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if m is None:
    return None
  out = dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
             alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
             code=int(m.generated_code_size_in_bytes))
  out["estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  return out


def device_memory_limit(device: jax.Device) -> int | None:
  """Bytes one device's allocator may use; on CPU, the host RAM shared by its devices."""
  stats = _memory_stats(device)
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu" and hasattr(os, "sysconf"):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram // max(1, jax.local_device_count()))
  return None


def _memory_stats(device: jax.Device) -> dict[str, Any] | None:
  try:
    return device.memory_stats()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


# ---------------------------------------------------------------------------------------------
# The step.


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
  each candidate (`memory_analysis(...)['estimate']`, per device) is compared with the
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
        mem = memory_analysis(executable)
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


def _run_settings(config, text_len: int | None) -> dict[str, Any]:
  """The settings a report names its run by (beside the batch and the device)."""
  return {
      "text_len": config.data.text_len if text_len is None else text_len,
      "compute_dtype": config.compute_dtype,
      "remat": config.model.remat,
      "scan_layers": bool(config.model.scan_layers),
      "attention": platform.resolve_attention(config),  # 'auto' as resolved on this platform
  }


def _median(xs: list[float]) -> float:
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
      (it runs the other implementation's block, `benchmark_torch.SideBySide.run`).
    block: steps per block with `other`.
    precompiled: `compile_step`'s result for this batch where the caller compiled it already
      (the memory check before allocating): reused, and its compile time reported.

  Returns:
    The report dict (see the module docstring), without the input-pipeline keys.
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  sharding.check_batch_size(batch_size, trainer.mesh)
  compiled, lower_s, compile_s, lowered = (
      precompiled or compile_step(trainer, config, batch_size, text_len))
  hlo = compiled.as_text()
  if dump_hlo:
    with open(dump_hlo, "w") as f:
      f.write(hlo)
  stats = hlo_stats(hlo)
  stats["lowered"] = lowered_stats(lowered.as_text())
  mem = memory_analysis(compiled)
  devices = trainer.mesh.devices.flatten().tolist()
  xla_flops = _cost_flops(compiled)
  # The compiled module is one device's share of the SPMD program.
  xla_flops_total = None if xla_flops is None else xla_flops * len(devices)
  analytic = analytic_flops(config, batch_size, text_len)

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

  step_time = _median(times)
  kind = devices[0].device_kind
  peak = peak_flops_per_device(kind)
  stats_now = [_memory_stats(d) for d in jax.local_devices()]
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
      "mfu": mfu(analytic["total"], step_time, len(devices), peak),
      "peak_flops_per_device": peak,
      "peak_memory_bytes": max(peaks) if peaks else (mem or {}).get("estimate"),
      "peak_memory_source": "device.memory_stats" if peaks else "compiled.memory_analysis",
      "compile_time_s": lower_s + compile_s,
      "lower_time_s": lower_s,
      "device": f"{kind} x{len(devices)}",
      "platform": devices[0].platform,
      "batch_size": batch_size,
      "per_device_batch": batch_size // len(devices),
      **_run_settings(config, text_len),
      "steps": steps,
      "step_times_s": times,
      "loss": float(metrics["loss"]) if "loss" in metrics else None,
      "flops_analytic_parts": {k: v for k, v in analytic.items() if k != "total"},
      "memory": mem,
      "state_bytes_per_device": int(state_bytes),
      "device_memory_limit_bytes": device_memory_limit(devices[0]),
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


# ---------------------------------------------------------------------------------------------
# The input pipeline, alone and feeding the step.


def demo_records(config: ml_collections.ConfigDict, directory: str, num_videos: int,
                 log: Callable[[str], None] = print) -> dict[str, str]:
  """Synthetic demo records (and their tokenizer) at the config's resolution.

  The frames are stored with short side config.data.resize_short, like prepared real videos,
  so the pipeline decodes and crops the same number of pixels as on real data.

  Returns:
    dict(train=GLOB, tokenizer=PATH).
  """
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.demo.num_train_videos = num_videos
    c.demo.num_eval_videos = 1
  log(f"generating {num_videos} synthetic videos (short side {c.data.resize_short}) "
      f"into {directory}")
  paths = synthetic.ensure_demo_data(c, directory, verbose=False)
  return {"train": paths["train"], "tokenizer": paths["tokenizer"]}


def benchmark_input(trainer, config, records: str, tokenizer: str, *, batches: int,
                    steps: int, warmup: int) -> dict[str, Any]:
  """Clips/s of the input pipeline alone, then of the pipeline feeding the trainer's step.

  Args:
    trainer: a `train.Trainer`.
    config: the run config; its batch_size and data.* shape the pipeline.
    records: glob(s) of training records.
    tokenizer: sentencepiece model.
    batches: batches the pipeline alone is timed over.
    steps: steps timed together (after `warmup` untimed ones, which include compiling the
      step for the pipeline's transcript length if it differs from the synthetic one).
    warmup: untimed steps.

  Returns:
    `input_*` keys from `input_pipeline.measure_throughput` and `together_step_time_s`,
    `together_clips_per_s` (median over the timed steps).
  """
  from tvts_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  alone = input_pipeline.measure_throughput(config, records, tokenizer, batches)
  report = {f"input_{k}": v for k, v in alone.items()}
  it = input_pipeline.make_train_iterator(config, records, tokenizer)
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    metrics = trainer.step(next(it))
    jax.block_until_ready((trainer.state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  step_time = _median(times)
  report.update(together_step_time_s=step_time,
                together_clips_per_s=config.batch_size / step_time,
                together_step_times_s=times)
  return report


# ---------------------------------------------------------------------------------------------
# Command line.


def _summary(report: dict[str, Any]) -> str:
  gib = lambda x: "?" if x is None else f"{x / 2**30:.2f} GiB"
  fmt = lambda x, f: "n/a" if x is None else format(x, f)
  lines = [
      f"device {report['device']}, batch {report['batch_size']}, text_len "
      f"{report['text_len']}, {report['compute_dtype']}, remat={report['remat']}, "
      f"scan_layers={report['scan_layers']}",
      f"step {report['step_time_s'] * 1e3:.1f} ms (median of {report['steps']}), "
      f"{report['clips_per_s']:.2f} clips/s, compile {report['compile_time_s']:.1f} s",
      f"FLOPs/step: XLA {fmt(report['flops_per_step'], '.4g')}, analytic "
      f"{report['flops_per_step_analytic']:.4g}; {fmt(report['tflops_per_s'], '.3f')} "
      f"TFLOP/s (XLA), {report['model_tflops_per_s']:.3f} (model); "
      f"MFU {fmt(report['mfu'], '.3f')}",
      f"memory: peak {gib(report['peak_memory_bytes'])} ({report['peak_memory_source']}), "
      f"state {gib(report['state_bytes_per_device'])}/device, device limit "
      f"{gib(report['device_memory_limit_bytes'])}",
  ]
  h = report["hlo"]
  lines.append(f"HLO: {h['copies']} copies ({h['copy_bytes'] / 2**20:.1f} MiB, of which "
               f"{h['state_copies']} of state/batch inputs: "
               f"{h['state_copy_bytes'] / 2**20:.1f} MiB), {h['transposes']} unfused "
               f"transposes, dots {h['dots']}, exp {h['exponentials']}, fused attention "
               f"{h['fused_attention']}; as lowered: dots {h['lowered']['dots']}, exp "
               f"{h['lowered']['exponentials']}")
  if "input_clips_per_s" in report:
    lines.append(f"input pipeline alone: {report['input_clips_per_s']:.1f} clips/s "
                 f"({report['input_clips_per_s_per_core']:.1f} per core, "
                 f"{report['input_cores']} cores); step alone {report['clips_per_s']:.1f}; "
                 f"together {report['together_clips_per_s']:.1f} clips/s -> limited by "
                 f"{report['limited_by']}")
  if "torch_step_time_s" in report:
    lines.append(f"PyTorch reference architecture, same shapes: step "
                 f"{report['torch_step_time_s']:.3f} s, {report['torch_clips_per_s']:.3f} "
                 f"clips/s -> ours is {report['speedup_vs_torch']:.2f}x")
  return "\n".join(lines)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  return str(x)


def main(argv) -> None:
  """The command line (flags in `_define_flags`)."""
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  from absl import flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if FLAGS.aot_target:
    _aot_main(FLAGS)
    return
  # --input uses tf.data: keep TensorFlow off the accelerators, which are JAX's. The step alone
  # needs no TensorFlow, so a JAX-only environment (an accelerator image) can time it.
  if importlib.util.find_spec("tensorflow") is not None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  from tvts_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_malloc_tuned = host_memory.configure(FLAGS.host_malloc)  # before JAX's CPU client
  from tvts_jax import train  # pylint: disable=g-import-not-at-top

  config = config_schema.validate(FLAGS.config)
  text_len = FLAGS.text_len
  if text_len is not None and not 2 <= text_len <= config.data.text_len:
    raise ValueError(f"--text_len={text_len} must be in [2, config.data.text_len="
                     f"{config.data.text_len}]")
  log = print if jax.process_index() == 0 else (lambda _: None)
  mesh = sharding.make_mesh(config.mesh)
  t0 = time.perf_counter()
  trainer = train.Trainer(config, mesh)
  log(f"{jax.device_count()} x {jax.devices()[0].device_kind}; state created in "
      f"{time.perf_counter() - t0:.1f} s")

  search, precompiled = None, None
  batch_size = config.batch_size
  limit = device_memory_limit(jax.devices()[0])
  if FLAGS.find_max_batch:
    if limit is None:
      raise ValueError("--find_max_batch: this backend reports no memory limit")
    log("searching the largest batch that fits:")
    kept: dict[int, Any] = {}
    search = find_max_batch(trainer, config, text_len, limit_bytes=limit,
                            fraction=FLAGS.memory_fraction, max_batch=FLAGS.max_batch,
                            multiple=FLAGS.batch_multiple, compiled=kept, log=log)
    if not search["max_batch"]:
      raise ValueError("not even one example per device fits")
    batch_size = search["max_batch"]
    precompiled = kept.get(batch_size)
  elif limit is not None and jax.devices()[0].platform != "cpu":
    # Check before allocating: an oversized batch is a message, not an OOM crash.
    precompiled = compile_step(trainer, config, batch_size, text_len)
    mem = memory_analysis(precompiled[0])
    if mem and mem["estimate"] > limit:
      raise ValueError(f"batch {batch_size} needs {mem['estimate'] / 2**30:.1f} GiB per "
                       f"device, more than the {limit / 2**30:.1f} GiB available; try "
                       "--find_max_batch or --config.model.remat=full")

  # The config at the batch that was timed (--find_max_batch may have changed it).
  run_config = config.copy_and_resolve_references()
  with run_config.unlocked():
    run_config.batch_size = batch_size
  torch_side = None
  if FLAGS.compare_torch:
    from tvts_jax import benchmark_torch  # pylint: disable=g-import-not-at-top
    log("starting the PyTorch model of the reference architecture at the same shapes; the "
        "two are timed in alternating blocks of steps ...")
    torch_side = benchmark_torch.SideBySide(
        run_config, text_len or config.data.text_len, FLAGS.warmup)
  report = benchmark_step(trainer, config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                          text_len=text_len, batch_size=batch_size, dump_hlo=FLAGS.dump_hlo,
                          profile_dir=FLAGS.profile_dir,
                          other=torch_side.run if torch_side else None,
                          precompiled=precompiled)
  report["host_malloc_tuned"] = host_malloc_tuned
  if torch_side:
    report.update(torch_side.close())
    report["speedup_vs_torch"] = report["torch_step_time_s"] / report["step_time_s"]
    report["compare"] = f"interleaved blocks of {SIDE_BY_SIDE_BLOCK} steps"
  if search is not None:
    report["max_batch_search"] = search
    report["max_batch"] = search["max_batch"]

  if FLAGS.input:
    with contextlib.ExitStack() as stack:
      records, tokenizer = FLAGS.records, FLAGS.tokenizer
      if not records:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="tvts-bench-"))
        paths = demo_records(config, directory, FLAGS.input_videos, log=log)
        records, tokenizer = paths["train"], paths["tokenizer"]
      elif not tokenizer:
        raise ValueError("--records needs --tokenizer")
      report.update(benchmark_input(trainer, run_config, records, tokenizer,
                                    batches=FLAGS.input_batches, steps=FLAGS.steps,
                                    warmup=FLAGS.warmup))
      report["input_records"] = records if FLAGS.records else "synthetic (generated)"
    report["limited_by"] = ("input" if report["input_clips_per_s"] < report["clips_per_s"]
                            else "step")

  log(_summary(report))
  log(json.dumps(report, default=_json_default))


def _aot_main(FLAGS) -> None:  # pylint: disable=invalid-name
  """--aot_target: compile the step for a GPU this machine lacks; report memory, no timing."""
  from tvts_jax import aot  # pylint: disable=g-import-not-at-top
  aot.configure_environment()  # before JAX starts its backends
  config = config_schema.validate(FLAGS.config)
  target, text_len = FLAGS.aot_target, FLAGS.text_len
  t0 = time.perf_counter()
  trainer = aot.AotTrainer(config, target, FLAGS.aot_devices)
  limit = aot.memory_limit(target)
  print(f"compiling for {FLAGS.aot_devices} x {aot.TARGETS[target][0]} (deviceless; "
        f"allocator limit {limit / 2**30:.1f} GiB per device)")
  report: dict[str, Any] = dict(aot_target=target, device=f"{aot.TARGETS[target][0]} x"
                                f"{FLAGS.aot_devices}", limit_bytes=limit,
                                **_run_settings(config, text_len))
  batch_size, kept = config.batch_size, {}
  if FLAGS.find_max_batch:
    search = find_max_batch(trainer, config, text_len, limit_bytes=limit,
                            fraction=FLAGS.memory_fraction, max_batch=FLAGS.max_batch,
                            multiple=FLAGS.batch_multiple, compiled=kept)
    report.update(max_batch=search["max_batch"], max_batch_search=search)
    batch_size = search["max_batch"] or batch_size
  # The search compiled the step at the batch it found: reuse it rather than compile again.
  compiled, _, compile_s, _ = (kept.get(batch_size)
                               or compile_step(trainer, config, batch_size, text_len))
  mem = memory_analysis(compiled)
  report.update(batch_size=batch_size, compile_time_s=compile_s, memory=mem,
                peak_memory_bytes=None if mem is None else mem["estimate"],
                hlo=hlo_stats(compiled.as_text()),
                total_time_s=time.perf_counter() - t0)
  print(json.dumps(report, default=_json_default))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config_flags.DEFINE_config_file(
      "config", os.path.join(here, "configs", "small.py"),
      "Config file; override keys with --config.KEY=VALUE.", lock_config=True)
  flags.DEFINE_integer("steps", 10, "Timed steps; the median is reported.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps before the timed ones.")
  flags.DEFINE_integer("text_len", None,
                       "Transcript length of the synthetic batches (default: "
                       "config.data.text_len, the maximum).")
  flags.DEFINE_bool("find_max_batch", False,
                    "Search the largest global batch that fits the device memory (compiled "
                    "memory analysis), then time the step at that batch.")
  flags.DEFINE_float("memory_fraction", 0.9,
                     "--find_max_batch: share of the device memory a batch may use.")
  flags.DEFINE_integer("max_batch", 1 << 14, "--find_max_batch: largest batch tried.")
  flags.DEFINE_integer("batch_multiple", 1,
                       "--find_max_batch: try only multiples of this (and of the device "
                       "count): fewer compiles, the answer within one multiple.")
  flags.DEFINE_bool("input", False,
                    "Also time the input pipeline alone and feeding the step.")
  flags.DEFINE_string("records", "",
                      "--input: glob(s) of training records (default: synthetic records "
                      "generated at the config's resolution into a temporary directory).")
  flags.DEFINE_string("tokenizer", "", "--input: sentencepiece model of --records.")
  flags.DEFINE_integer("input_batches", 20, "--input: batches the pipeline alone is timed on.")
  flags.DEFINE_integer("input_videos", 32, "--input: synthetic videos to generate.")
  flags.DEFINE_string("dump_hlo", "", "Write the compiled step's optimised HLO to this file.")
  flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of the timed steps here.")
  flags.DEFINE_enum("host_malloc", "auto", ["auto", "on", "off"],
                    "Host allocator tuning as in main.py (tvts_jax/host_memory.py).")
  flags.DEFINE_enum("aot_target", "", ["", "h100", "h200"],
                    "Compile the step for this GPU without having one (tvts_jax/aot.py; needs "
                    "jax's CUDA plugin) and report its memory (and --find_max_batch); no timing.")
  flags.DEFINE_integer("aot_devices", 1, "--aot_target: number of such GPUs in the mesh.")
  flags.DEFINE_bool("compare_torch", False,
                    "Also time a PyTorch model of the reference architecture at the same "
                    "shapes (tvts_jax/benchmark_torch.py, in a subprocess; needs .[torch]), in "
                    "blocks of steps alternating with ours, and report torch_step_time_s and "
                    "speedup_vs_torch.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
