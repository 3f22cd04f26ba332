"""The Apache Beam engine: the conversion as a Beam pipeline, for any runner.

The only module that imports Apache Beam; `prepare` imports it when a Beam runner is asked
for, so the local engine (and `convert_video`) runs without Beam installed. Each video is
converted by `video_records.process_item`, as in the local engine; records are grouped by
shard and sorted by (video id, window) inside it, the order the local engine writes in, so
both engines write byte-identical shards. Each shard is marked complete after it is written
(`progress`), so a pipeline that dies is resumed by running it again (by either engine); the
pipeline itself writes the summary from the markers.
"""

from __future__ import annotations

from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options import pipeline_options as po

from data_pipelines import progress
from data_pipelines import shards
from data_pipelines import video_records


class _ConvertFn(beam.DoFn):
  """Beam: item -> (shard, ("outcome", dict)), then (shard, ("record", key, bytes)) each."""

  def __init__(self, options: video_records.Options):
    super().__init__()
    self._options = options

  def setup(self):
    if self._options.asr:
      video_records.asr_backend(self._options)  # the model, once per worker

  def process(self, item):
    outcome, recs = video_records.process_item(item, self._options)
    yield item.shard, ("outcome", outcome)
    for key, record in recs:
      yield item.shard, ("record", key, record)


class _WriteShardFn(beam.DoFn):
  """Beam: (shard, [converted values or None]) -> writes the shard, then its marker."""

  def __init__(self, output_dir: str, meta: dict[str, Any], run_id: str):
    super().__init__()
    self._output_dir = output_dir
    self._meta = meta
    self._run_id = run_id

  def process(self, element):
    shard, values = element
    values = [v for v in values if v is not None]
    outcomes = [v[1] for v in values if v[0] == "outcome"]
    # Sorting by (video_id, window) gives the order the local engine writes in.
    recs = sorted((v[1:] for v in values if v[0] == "record"), key=lambda kv: kv[0])
    m = self._meta
    count = shards.write_shard(self._output_dir, m["name"], m["split"], shard,
                               m["num_shards"], (record for _, record in recs))
    progress.mark_done(self._output_dir, m, self._run_id, shard, count, outcomes)
    yield shard


def _finish(unused, written, output_dir, meta):
  del unused, written  # `written` only makes this step wait for every shard
  progress.finish(output_dir, meta)


def _not_done(item: video_records.VideoItem, done: frozenset[int]) -> bool:
  return item.shard not in done


def run(output_dir: str, meta: dict[str, Any], options: video_records.Options, runner: str,
        pipeline_args: Sequence[str], run_id: str, done: set[int]):
  """Runs the conversion of the shards not in `done` as a Beam pipeline, which then writes
  the summary from every shard's completion marker.

  Args:
    output_dir: where the shards and the summary files go.
    meta: the run's settings for the summary (name, split, num_shards, ...).
    options: conversion options.
    runner: a Beam runner name (DirectRunner, DataflowRunner, ...).
    pipeline_args: extra Beam pipeline options.
    run_id: the conversion's id (`progress.start`).
    done: shards already complete, not converted again.
  """
  opts = po.PipelineOptions(list(pipeline_args), runner=runner)
  direct = opts.view_as(po.DirectOptions)
  if direct.direct_num_workers != 1 and "--direct_running_mode" not in " ".join(pipeline_args):
    direct.direct_running_mode = "multi_processing"  # in_memory would run on one thread
  # The listing travels as a file (`progress` wrote it), not inside the pipeline graph:
  # runners cap the graph's size (Dataflow's job graph limit) far below what a listing of
  # millions of videos takes.
  items_path = progress.listing_path(output_dir, meta["name"], meta["split"])
  todo = [s for s in range(meta["num_shards"]) if s not in done]
  with beam.Pipeline(options=opts) as p:
    converted = (
        p
        | "ReadItems" >> beam.io.ReadFromText(items_path)
        | "ParseItems" >> beam.Map(progress.item_from_json)
        | "NotDone" >> beam.Filter(_not_done, frozenset(done))
        | "Spread" >> beam.Reshuffle()  # one small file is one bundle; spread the work
        | "Convert" >> beam.ParDo(_ConvertFn(options)))
    # Every shard to write enters the grouping, so empty shards are written too.
    shard_ids = p | "ShardIds" >> beam.Create([(s, None) for s in todo])
    written = (
        (converted, shard_ids)
        | "AllShards" >> beam.Flatten()
        | "ByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(_WriteShardFn(output_dir, meta, run_id)))
    _ = (p
         | "Once" >> beam.Create([None])
         | "WriteSummary" >> beam.Map(_finish, written=beam.pvalue.AsList(written),
                                      output_dir=output_dir, meta=meta))
