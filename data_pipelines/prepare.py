"""Converts videos and their transcripts into TFRecord shards of the `records` schema.

    # every video under DIR with a transcript of the same stem beside it (.json/.vtt/.srt)
    python -m data_pipelines.prepare --videos=DIR --output_dir=OUT --num_shards=64
    # the same through Apache Beam, locally on 8 processes, or on any runner
    python -m data_pipelines.prepare --videos=DIR --output_dir=OUT --num_shards=64 \
        --runner=DirectRunner --direct_num_workers=8
    # videos without captions: our speech recognition writes their transcripts inline
    python -m data_pipelines.prepare --videos=DIR --output_dir=OUT --num_shards=64 \
        --asr=vosk:/models/vosk-model-en-us-0.22
    # a labelled evaluation set (UCF101 layout DIR/CLASS/video.avi; no transcripts needed)
    python -m data_pipelines.prepare --videos=DIR --output_dir=OUT --num_shards=8 \
        --labels=folders --name=ucf101 --split=test

This module is the command: `prepare` (what both engines share: checks, listing, the run's
settings), the local engine (a process pool) and the command line. The work is elsewhere:
`listing` (inputs, ids, shards), `video_records` (one video -> records, with `decode` for the
frames), `shards` (writing shards and the summary), `beam_engine` (Apache Beam, imported only
when a Beam runner is asked for).

One pure function (`video_records.convert_video`) converts a video for both engines, shard
assignment is a pure function of the input listing, and records inside a shard are sorted by
(video id, window), so the local loop and any Beam runner write byte-identical shards for the
same input.

A conversion that dies (SIGKILL, preemption) resumes when started again with the same
arguments: completed shards are marked (`progress`) and skipped, so the output ends
byte-identical to an uninterrupted run's; other arguments are an error naming the difference.

A video that cannot be used is skipped with a reason code (`video_records.SKIP_REASONS`) and
never stops the run: the rest of its shard is written, `dataset_info.json` counts kept and
skipped videos by reason, and `skipped.jsonl` lists each skipped video with its reason and
details.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import multiprocessing
import os
from typing import Any, Sequence

from absl import logging
import tensorflow as tf
import tqdm

from data_pipelines import asr
from data_pipelines import listing
from data_pipelines import progress
from data_pipelines import records
from data_pipelines import shards
from data_pipelines import video_records


# ------------------------------------------------------------------------------------------
# The local engine.

def _run_local(items: Sequence[video_records.VideoItem], output_dir: str, meta: dict[str, Any],
               options: video_records.Options, workers: int, run_id: str, done: set[int]):
  """Converts the shards not in `done` in shard order (a process pool if workers > 1),
  streaming each shard out and marking it complete."""
  num_shards = meta["num_shards"]
  order = sorted((it for it in items if it.shard not in done),
                 key=lambda it: (it.shard, it.video_id))
  per_shard = collections.Counter(it.shard for it in order)
  convert = functools.partial(video_records.process_item, options=options)
  with contextlib.ExitStack() as stack:
    if workers > 1 and order:
      # spawn: the parent has TensorFlow loaded, which is not safe to fork.
      pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
      results = pool.imap(convert, order)  # ordered, so shards stream out in order
    else:
      results = map(convert, order)
    results = iter(results)
    bar = stack.enter_context(tqdm.tqdm(total=len(order), unit="video",
                                        desc=f"{meta['name']}-{meta['split']}"))
    num_skipped = 0

    def shard_records(count, outcomes):
      nonlocal num_skipped
      for outcome, recs in itertools.islice(results, count):
        outcomes.append(outcome)
        if outcome["reason"]:
          num_skipped += 1
          bar.set_postfix(skipped=num_skipped, refresh=False)
        bar.update(1)
        for _, record in recs:
          yield record

    for s in range(num_shards):
      if s in done:
        continue
      outcomes = []
      count = shards.write_shard(output_dir, meta["name"], meta["split"], s, num_shards,
                                 shard_records(per_shard[s], outcomes))
      progress.mark_done(output_dir, meta, run_id, s, count, outcomes)


# ------------------------------------------------------------------------------------------
# The command: what both engines share.

def prepare(videos: str | None, output_dir: str, num_shards: int,
            options: video_records.Options = video_records.Options(), *,
            manifest: str | None = None, labels: str | None = None, name: str = "tvts",
            split: str = "train",
            runner: str = "local", workers: int = 1,
            pipeline_args: Sequence[str] = (), restart: bool = False) -> dict[str, Any]:
  """Converts a set of videos into `num_shards` TFRecord shards plus a summary.

  Args:
    videos: directory of videos (recursive), transcripts beside them; or None with manifest.
    output_dir: where shards, `dataset_info.json` and `skipped.jsonl` go (local or gs://).
      One split per directory: the summary files are per directory.
    num_shards: number of shard files (all written, even if empty).
    options: conversion options.
    manifest: CSV with columns video, transcript[, label] instead of `videos`.
    labels: None, "folders" (class folders under `videos`) or "csv" (manifest's label).
    name: dataset name, the shard files' prefix.
    split: split name (train, test, ...).
    runner: "local" for the built-in loop, else a Beam runner name (DirectRunner, ...).
    workers: processes of the local loop.
    pipeline_args: extra Beam pipeline options (e.g. ["--direct_num_workers=8"]).
    restart: drop an unfinished earlier conversion in `output_dir` instead of resuming it.
      Without it, a conversion killed before its end resumes where it stopped when started
      again with the same arguments (`progress`), and other arguments are an error.

  Returns:
    The summary written to `dataset_info.json`.

  Raises:
    progress.ArgumentsChanged: `output_dir` holds an unfinished conversion with other
      arguments (the message names the differences).
  """
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} must be >= 1")
  if (videos is None) == (manifest is None):
    raise ValueError("give exactly one of videos (a directory) and manifest (a CSV)")
  if labels not in (None, *listing.LABEL_MODES):
    raise ValueError(f"labels={labels!r}; one of {listing.LABEL_MODES} or None")
  if runner == "local" and pipeline_args:
    raise ValueError(f"pipeline options {list(pipeline_args)} need a Beam runner")
  if options.require_transcripts is None:
    options = dataclasses.replace(options, require_transcripts=labels is None)
  if options.asr:
    # A model that cannot be used is an error now, not a skip of every video. The local
    # engine with one process keeps this copy; other processes load their own.
    video_records.asr_backend(options)
    if runner != "local" or workers > 1:
      asr.cached.cache_clear()
  if manifest:
    items, class_names = listing.read_manifest(manifest, num_shards, labels)
  else:
    items, class_names = listing.list_videos(videos, num_shards, labels)
  tf.io.gfile.makedirs(output_dir)
  meta = {
      "name": name, "split": split, "num_shards": num_shards,
      "engine": "local" if runner == "local" else f"beam:{runner}",
      "inputs": manifest or videos, "labels": labels or "",
      "options": dataclasses.asdict(options),
  }
  if class_names is not None:
    meta["class_names"] = class_names
  if not items:
    logging.warning("no videos (%s) in %s", ", ".join(listing.VIDEO_EXTENSIONS),
                    manifest or videos)
  run_id, done = progress.start(output_dir, meta, items, restart=restart)
  logging.info("%d videos -> %d shards in %s (%s)%s", len(items), num_shards, output_dir,
               meta["engine"], f"; {len(done)} shards complete already" if done else "")
  if runner == "local":
    _run_local(items, output_dir, meta, options, workers, run_id, done)
    progress.finish(output_dir, meta)
  else:
    # Imported here only: the local engine must not need Apache Beam installed.
    from data_pipelines import beam_engine  # pylint: disable=g-import-not-at-top
    beam_engine.run(output_dir, meta, options, runner, pipeline_args, run_id, done)
  return records.read_info(output_dir)


# ------------------------------------------------------------------------------------------
# Command line.

def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  default = video_records.Options()
  flags.DEFINE_string("videos", None, "directory of videos (searched recursively), each with "
                      "a transcript of the same stem beside it (.json, .vtt, .srt)")
  flags.DEFINE_string("manifest", None, "CSV with columns video,transcript[,label] "
                      "(paths relative to the CSV) instead of --videos")
  flags.DEFINE_string("output_dir", None, "output directory (local or gs://)", required=True)
  flags.DEFINE_integer("num_shards", None, "number of shard files", required=True)
  flags.DEFINE_string("name", "tvts", "dataset name, the shard files' prefix")
  flags.DEFINE_string("split", "train", "split name")
  flags.DEFINE_float("fps", default.fps, "frames stored per second")
  flags.DEFINE_integer("short_side", default.short_side, "stored frames' short side (px)")
  flags.DEFINE_float("window_seconds", default.window_seconds,
                     "longer videos are cut into windows of this length")
  flags.DEFINE_float("min_duration", default.min_duration, "skip videos shorter than this")
  flags.DEFINE_integer("jpeg_quality", default.jpeg_quality, "JPEG quality")
  flags.DEFINE_float("max_jitter", default.max_jitter,
                     "seconds a word may be out of order and still be sorted into place")
  flags.DEFINE_enum("labels", None, list(listing.LABEL_MODES),
                    "labelled set: 'folders' (DIR/CLASS/video) or 'csv' (manifest column)")
  flags.DEFINE_boolean("require_transcripts", None,
                       "skip videos without a usable transcript (default: true, but false "
                       "with --labels)")
  flags.DEFINE_string("asr", "", "BACKEND:MODEL_DIR (faster-whisper or vosk): transcribe "
                      "the videos without a transcript beside them")
  flags.DEFINE_string("asr_language", "", "with --asr: the language wanted (ISO code)")
  flags.DEFINE_enum("asr_device", "cpu", ["cpu", "cuda"], "with --asr: where the model runs")
  flags.DEFINE_string("runner", "local", "'local' (built-in loop) or a Beam runner: "
                      "DirectRunner, DataflowRunner, ...; other flags go to Beam")
  flags.DEFINE_integer("workers", 0, "processes of the local runner (0: all CPUs)")
  flags.DEFINE_boolean("restart", False, "drop an unfinished earlier conversion in "
                       "--output_dir instead of resuming it")


def _main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  f = flags.FLAGS
  if f.runner == "local" and argv[1:]:
    raise app.UsageError(f"unknown flags {argv[1:]}; pipeline options need a Beam --runner")
  tf.config.set_visible_devices([], "GPU")  # the converter never needs one
  options = video_records.Options(
      fps=f.fps, short_side=f.short_side, window_seconds=f.window_seconds,
      min_duration=f.min_duration, jpeg_quality=f.jpeg_quality,
      require_transcripts=f.require_transcripts, max_jitter=f.max_jitter, asr=f.asr,
      asr_language=f.asr_language, asr_device=f.asr_device)
  info = prepare(f.videos, f.output_dir, f.num_shards, options, manifest=f.manifest,
                 labels=f.labels, name=f.name, split=f.split, runner=f.runner,
                 workers=f.workers or os.cpu_count() or 1, pipeline_args=argv[1:],
                 restart=f.restart)
  print(f"{f.output_dir}:\n{shards.format_summary(info)}")


def _parse_flags(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  # Flags this module does not define are Beam pipeline options (--project, --region, ...).
  return flags.FLAGS(argv, known_only=True)


def cli():
  """Entry point of `python -m data_pipelines.prepare`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
