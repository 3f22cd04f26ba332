r"""The command line: speed, FLOPs, MFU and memory of the training step; input throughput.

    python -m tvts_jax.perf --config=configs/small.py --steps=20
    python -m tvts_jax.perf --config=configs/paper.py --config.batch_size=2 --text_len=32
    python -m tvts_jax.perf --config=configs/paper.py --config.batch_size=24 \
        --config.compute_dtype=bfloat16 --find_max_batch          # on a GPU / TPU
    python -m tvts_jax.perf --config=configs/paper.py --config.batch_size=8 --input \
        [--records='DIR/train.tfrecord-*' --tokenizer=DIR/spm.model]
    python -m tvts_jax.perf --config=configs/paper.py --config.batch_size=32 --input_only \
        --input_variant=base --input_variant=data.samples_per_visit=2 [--input_variant=...]

What it runs is the trainer's own step (`train.Trainer`: the sharded state, the jitted step with
the state donated) on synthetic batches of the config's shapes, placed on the devices once so
that the timing is the step alone (`step.benchmark_step`). The last line printed is one JSON
object; the keys are documented in the README section "Benchmark". The important ones:

    step_time_s          median over --steps timed steps, after --warmup untimed ones
    clips_per_s          batch_size / step_time_s
    flops_per_step       XLA's cost analysis of the compiled step, all devices together
    flops_per_step_analytic   3 x the forward matmul FLOPs (`flops.analytic_flops`)
    tflops_per_s         flops_per_step / step_time_s / 1e12
    mfu                  analytic FLOPs / step time / (devices x bf16 peak); null on CPU
    peak_memory_bytes    device.memory_stats() peak, or the compiled step's memory analysis
    compile_time_s       lowering + compiling the step

`--input` also measures the input pipeline alone on records (generated demo records at the
config's resolution when none are given) and the pipeline feeding the step, and says which of
the two limits. `--input_only` times the pipeline alone, without building the model: clips/s,
clips/s per core and per CPU-second, and the cores one accelerator consuming
`--accelerator_clips_per_s` (default: one H200 on the paper step) needs; each `--input_variant`
(config overrides such as `data.samples_per_visit=2`, or the generated records' `short_side` /
`jpeg_quality`) is timed side by side with the others, in alternating blocks. `--find_max_batch` searches the largest global batch whose compiled step fits
the device memory, from XLA's memory analysis (compiles only, so an oversized batch is a
number in the report, not an out-of-memory crash), then times the step at that batch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np

from tvts_jax import config_schema, sharding
from tvts_jax.perf import hlo, step
from tvts_jax.perf import input as input_timing


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
                 f"{report['limited_by']}; one accelerator at "
                 f"{report['accelerator_clips_per_s']:.0f} clips/s needs "
                 f"{report['cores_per_accelerator']} such cores "
                 f"({report['cores_per_accelerator_cpu_s']} at the per-CPU-second rate); the "
                 f"step measured here needs {report['input_cores_for_measured_step']}")
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
  if FLAGS.input_only:
    _input_only_main(FLAGS)
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
  limit = hlo.device_memory_limit(jax.devices()[0])
  if FLAGS.find_max_batch:
    if limit is None:
      raise ValueError("--find_max_batch: this backend reports no memory limit")
    log("searching the largest batch that fits:")
    kept: dict[int, Any] = {}
    search = step.find_max_batch(trainer, config, text_len, limit_bytes=limit,
                                 fraction=FLAGS.memory_fraction, max_batch=FLAGS.max_batch,
                                 multiple=FLAGS.batch_multiple, compiled=kept, log=log)
    if not search["max_batch"]:
      raise ValueError("not even one example per device fits")
    batch_size = search["max_batch"]
    precompiled = kept.get(batch_size)
  elif limit is not None and jax.devices()[0].platform != "cpu":
    # Check before allocating: an oversized batch is a message, not an OOM crash.
    precompiled = step.compile_step(trainer, config, batch_size, text_len)
    mem = hlo.memory_analysis(precompiled[0])
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
    from tvts_jax.perf import torch_ref  # pylint: disable=g-import-not-at-top
    log("starting the PyTorch model of the reference architecture at the same shapes; the "
        "two are timed in alternating blocks of steps ...")
    torch_side = torch_ref.SideBySide(
        run_config, text_len or config.data.text_len, FLAGS.warmup)
  report = step.benchmark_step(trainer, config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                               text_len=text_len, batch_size=batch_size,
                               dump_hlo=FLAGS.dump_hlo, profile_dir=FLAGS.profile_dir,
                               other=torch_side.run if torch_side else None,
                               precompiled=precompiled)
  report["host_malloc_tuned"] = host_malloc_tuned
  if torch_side:
    report.update(torch_side.close())
    report["speedup_vs_torch"] = report["torch_step_time_s"] / report["step_time_s"]
    report["compare"] = f"interleaved blocks of {step.SIDE_BY_SIDE_BLOCK} steps"
  if search is not None:
    report["max_batch_search"] = search
    report["max_batch"] = search["max_batch"]

  if FLAGS.input:
    with contextlib.ExitStack() as stack:
      records, tokenizer = FLAGS.records, FLAGS.tokenizer
      if not records:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="tvts-bench-"))
        paths = input_timing.demo_records(config, directory, FLAGS.input_videos, log=log)
        records, tokenizer = paths["train"], paths["tokenizer"]
      elif not tokenizer:
        raise ValueError("--records needs --tokenizer")
      report.update(input_timing.benchmark_input(
          trainer, run_config, records, tokenizer, batches=FLAGS.input_batches,
          steps=FLAGS.steps, warmup=FLAGS.warmup))
      report["input_records"] = records if FLAGS.records else "synthetic (generated)"
    report["limited_by"] = ("input" if report["input_clips_per_s"] < report["clips_per_s"]
                            else "step")
    report.update(input_timing.cores_report(
        report["input_clips_per_s_per_core"], report["input_clips_per_cpu_s"],
        FLAGS.accelerator_clips_per_s, "given (--accelerator_clips_per_s)"))
    report["input_cores_for_measured_step"] = input_timing.cores_needed(
        report["input_clips_per_s_per_core"], report["clips_per_s"])

  log(_summary(report))
  log(json.dumps(report, default=_json_default))


def _input_only_main(FLAGS) -> None:  # pylint: disable=invalid-name
  """--input_only: the input pipeline alone, its variants side by side; no model, no step."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  config = config_schema.validate(FLAGS.config)
  variants = [input_timing.parse_variant(v) for v in FLAGS.input_variant] or [{}]
  with contextlib.ExitStack() as stack:
    sets: dict[tuple[int, int], tuple[str, str]] = {}
    directory = None
    if FLAGS.records:
      if not FLAGS.tokenizer:
        raise ValueError("--records needs --tokenizer")
      if any(k in v for v in variants for k in input_timing.RECORD_KEYS):
        raise ValueError(f"--input_variant keys {input_timing.RECORD_KEYS} choose generated "
                         "records: drop --records to use them")
    elif FLAGS.input_records_dir:
      directory = FLAGS.input_records_dir
    else:
      directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="tvts-input-"))

    def records_of(v):
      if FLAGS.records:
        return FLAGS.records, FLAGS.tokenizer
      key = (int(v.get("short_side", config.data.resize_short)),
             int(v.get("jpeg_quality", 90)))
      if key not in sets:
        tokenizer = next(iter(sets.values()))[1] if sets else None
        paths = input_timing.demo_records(
            config, directory, FLAGS.input_videos, short_side=key[0], jpeg_quality=key[1],
            aspect=FLAGS.input_aspect, fps=FLAGS.input_fps, tokenizer=tokenizer)
        sets[key] = (paths["train"], paths["tokenizer"])
      return sets[key]

    for v in variants:  # every record set generated before any timing
      records_of(v)
    results = input_timing.compare_input(config, variants, records_of,
                                         batches=FLAGS.input_batches, rounds=FLAGS.input_rounds)
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
    from tvts_jax import sampling  # pylint: disable=g-import-not-at-top
    bounds = {}  # variants that decode the same records the same way share one measurement
    for v, r in zip(variants, results):
      vc = input_timing.variant_config(config, v)
      reference = None
      if not FLAGS.records:  # the first generated video again, at JPEG quality 100
        key = (int(v.get("short_side", config.data.resize_short)),
               int(v.get("jpeg_quality", 90)))
        reference = synthetic.make_video(
            synthetic.DEMO_SEED, "train", 0, short_side=key[0], fps=FLAGS.input_fps,
            aspect=FLAGS.input_aspect, jpeg_quality=100).frames
      r["frames_stored"] = input_timing.frame_quality(records_of(v)[0],
                                                      int(vc.data.resize_short),
                                                      reference=reference)
      decode_key = (records_of(v)[0], tuple(sorted(
          (k, x) for k, x in sampling.options(vc).items() if k != "samples_per_visit")))
      if decode_key not in bounds:
        bounds[decode_key] = input_timing.decode_bound(records_of(v)[0], vc)
      r.update(bounds[decode_key])
  for r in results:
    r.update(input_timing.cores_report(r["clips_per_s_per_core"], r["clips_per_cpu_s"],
                                       FLAGS.accelerator_clips_per_s,
                                       "given (--accelerator_clips_per_s)"))
    print(f"{r['variant']}: {r['clips_per_s']:.1f} clips/s, {r['clips_per_s_per_core']:.1f} "
          f"per core ({r['cores']} cores), {r['clips_per_cpu_s']:.1f} per CPU-second; one "
          f"accelerator at {r['accelerator_clips_per_s']:.0f} clips/s needs "
          f"{r['cores_per_accelerator']} cores ({r['cores_per_accelerator_cpu_s']} at the "
          f"per-CPU-second rate); decoding alone {r['decode_ms_per_frame']:.3f} CPU-ms a frame, "
          f"at most {r['decode_bound_clips_per_cpu_s']:.0f} clips per CPU-second; stored frames "
          f"{r['frames_stored']}")
  report = dict(batch_size=config.batch_size, frames=int(config.data.num_frames),
                image_size=int(config.data.image_size), rounds=FLAGS.input_rounds,
                batches=FLAGS.input_batches,
                records=FLAGS.records or (f"synthetic (generated: aspect {FLAGS.input_aspect:.3g}, "
                                          f"{FLAGS.input_fps:g} fps)"),
                load_average=list(os.getloadavg()), variants=results)
  print(json.dumps(report, default=_json_default))


def _aot_main(FLAGS) -> None:  # pylint: disable=invalid-name
  """--aot_target: compile the step for a GPU this machine lacks; report memory, no timing."""
  from tvts_jax.perf import aot  # pylint: disable=g-import-not-at-top
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
                                **step.run_settings(config, text_len))
  batch_size, kept = config.batch_size, {}
  if FLAGS.find_max_batch:
    search = step.find_max_batch(trainer, config, text_len, limit_bytes=limit,
                                 fraction=FLAGS.memory_fraction, max_batch=FLAGS.max_batch,
                                 multiple=FLAGS.batch_multiple, compiled=kept)
    report.update(max_batch=search["max_batch"], max_batch_search=search)
    batch_size = search["max_batch"] or batch_size
  # The search compiled the step at the batch it found: reuse it rather than compile again.
  compiled, _, compile_s, _ = (kept.get(batch_size)
                               or step.compile_step(trainer, config, batch_size, text_len))
  mem = hlo.memory_analysis(compiled)
  report.update(batch_size=batch_size, compile_time_s=compile_s, memory=mem,
                peak_memory_bytes=None if mem is None else mem["estimate"],
                hlo=hlo.hlo_stats(compiled.as_text()),
                total_time_s=time.perf_counter() - t0)
  print(json.dumps(report, default=_json_default))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
  flags.DEFINE_bool("input_only", False,
                    "Time the input pipeline alone (no model, no step), each --input_variant "
                    "side by side, and report the cores one accelerator needs.")
  flags.DEFINE_multi_string(
      "input_variant", [],
      "--input_only: one variant of the pipeline, 'KEY=VALUE,...' of config keys (e.g. "
      "data.samples_per_visit=2) or of the generated records (short_side=536, "
      "jpeg_quality=75); 'base' is the config as given. Repeat the flag to compare.")
  flags.DEFINE_float("input_aspect", 16 / 9,
                     "--input_only: width / height of the generated records' frames.")
  flags.DEFINE_float("input_fps", 2.0, "--input_only: frames per second of the generated records.")
  flags.DEFINE_string("input_records_dir", "",
                      "--input_only: keep the generated records here and reuse them in later "
                      "runs (default: a temporary directory).")
  flags.DEFINE_integer("input_rounds", 3,
                       "--input_only: rounds of alternating variants; medians are reported.")
  flags.DEFINE_float("accelerator_clips_per_s", input_timing.H200_PAPER_CLIPS_PER_S,
                     "--input/--input_only: clips/s one accelerator's step consumes, for the "
                     "cores-per-accelerator figure (default: one H200 on the paper step at "
                     "batch 256).")
  flags.DEFINE_string("dump_hlo", "", "Write the compiled step's optimised HLO to this file.")
  flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of the timed steps here.")
  flags.DEFINE_enum("host_malloc", "auto", ["auto", "on", "off"],
                    "Host allocator tuning as in main.py (tvts_jax/host_memory.py).")
  flags.DEFINE_enum("aot_target", "", ["", "h100", "h200"],
                    "Compile the step for this GPU without having one (tvts_jax/perf/aot.py; "
                    "needs jax's CUDA plugin) and report its memory (and --find_max_batch); no "
                    "timing.")
  flags.DEFINE_integer("aot_devices", 1, "--aot_target: number of such GPUs in the mesh.")
  flags.DEFINE_bool("compare_torch", False,
                    "Also time a PyTorch model of the reference architecture at the same "
                    "shapes (tvts_jax/perf/torch_ref.py, in a subprocess; needs .[torch]), in "
                    "blocks of steps alternating with ours, and report torch_step_time_s and "
                    "speedup_vs_torch.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
