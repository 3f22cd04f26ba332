"""What the compiled step looks like: HLO and StableHLO statistics, XLA's memory and cost
analyses of the executable, and the devices' memory limit and statistics."""

from __future__ import annotations

import collections
import os
import re
from typing import Any

import jax
import numpy as np

# Custom-call targets of fused attention kernels: cuDNN flash attention on GPU, Pallas/Mosaic
# kernels (splash, flash) on TPU.
_FUSED_ATTENTION = re.compile(r"fmha|flash|splash|attention|tpu_custom_call", re.IGNORECASE)

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
  stats = memory_stats(device)
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu" and hasattr(os, "sysconf"):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram // max(1, jax.local_device_count()))
  return None


def memory_stats(device: jax.Device) -> dict[str, Any] | None:
  """`device.memory_stats()` (bytes in use, peak, limit); None where the backend has none."""
  try:
    return device.memory_stats()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None


def cost_flops(compiled) -> float | None:
  """FLOPs of a compiled executable (one device's share) from XLA's cost analysis, or None."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None
