"""The Apache Beam engine: the conversion as a Beam pipeline, for any runner.

The only module that imports Apache Beam; `prepare` imports it when a Beam runner is asked
for, so the local engine (and `convert_video`) runs without Beam installed. Each video is
converted by `video_records.process_item`, as in the local engine; records are grouped by
shard and sorted by (video id, window) inside it, the order the local engine writes in, so
both engines write byte-identical shards. The pipeline itself writes the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options import pipeline_options as po
import tensorflow as tf

from data_pipelines import shards
from data_pipelines import video_records


class _TallyFn(beam.CombineFn):
  """`shards.Tally` as a Beam combiner."""

  def create_accumulator(self):
    return shards.Tally()

  def add_input(self, mutable_accumulator, element):
    return mutable_accumulator.add(element)

  def merge_accumulators(self, accumulators):
    accumulators = iter(accumulators)
    first = next(accumulators)
    for acc in accumulators:
      first.merge(acc)
    return first

  def extract_output(self, accumulator):
    return accumulator


_OUTCOMES = "outcomes"


class _ConvertFn(beam.DoFn):
  """Beam: item -> (shard, ((video_id, window), record bytes)), outcomes tagged aside."""

  def __init__(self, options: video_records.Options):
    super().__init__()
    self._options = options

  def process(self, item):
    outcome, recs = video_records.process_item(item, self._options)
    yield beam.pvalue.TaggedOutput(_OUTCOMES, outcome)
    for key, record in recs:
      yield item.shard, (key, record)


class _WriteShardFn(beam.DoFn):
  """Beam: (shard, [((video_id, window), record) or None]) -> writes it -> (shard, count)."""

  def __init__(self, output_dir: str, name: str, split: str, num_shards: int):
    super().__init__()
    self._args = (output_dir, name, split)
    self._num_shards = num_shards

  def process(self, element):
    shard, values = element
    # Sorting by (video_id, window) gives the order the local engine writes in.
    values = sorted((v for v in values if v is not None), key=lambda kv: kv[0])
    yield shard, shards.write_shard(*self._args, shard, self._num_shards,
                                     (record for _, record in values))


def _write_beam_summary(unused, tally, counts, skipped, output_dir, meta):
  del unused
  shards.write_outputs(output_dir, shards.summary(tally, dict(counts), meta), skipped)


def _has_reason(outcome):
  return bool(outcome["reason"])


def _item_from_json(line: str) -> video_records.VideoItem:
  return video_records.VideoItem(**json.loads(line))


def run(items: Sequence[video_records.VideoItem], output_dir: str, meta: dict[str, Any],
        options: video_records.Options, runner: str, pipeline_args: Sequence[str]):
  """Runs the conversion as a Beam pipeline; the pipeline itself writes the summary.

  Args:
    items: the listed videos, each with its shard.
    output_dir: where the shards and the summary files go.
    meta: the run's settings for the summary (name, split, num_shards, ...).
    options: conversion options.
    runner: a Beam runner name (DirectRunner, DataflowRunner, ...).
    pipeline_args: extra Beam pipeline options.
  """
  # The listing travels as a file, not inside the pipeline graph: runners cap the graph's size
  # (Dataflow's job graph limit) far below what a listing of millions of videos takes.
  items_path = os.path.join(output_dir, f".{meta['name']}-{meta['split']}-items.jsonl")
  with tf.io.gfile.GFile(items_path, "w") as f:
    f.write("".join(json.dumps(dataclasses.asdict(it)) + "\n" for it in items))
  opts = po.PipelineOptions(list(pipeline_args), runner=runner)
  direct = opts.view_as(po.DirectOptions)
  if direct.direct_num_workers != 1 and "--direct_running_mode" not in " ".join(pipeline_args):
    direct.direct_running_mode = "multi_processing"  # in_memory would run on one thread
  try:
    _build_and_run(opts, items_path, output_dir, meta, options)
  finally:
    tf.io.gfile.remove(items_path)


def _build_and_run(opts, items_path, output_dir, meta, options):
  num_shards, name, split = meta["num_shards"], meta["name"], meta["split"]
  with beam.Pipeline(options=opts) as p:
    converted = (
        p
        | "ReadItems" >> beam.io.ReadFromText(items_path)
        | "ParseItems" >> beam.Map(_item_from_json)
        | "Spread" >> beam.Reshuffle()  # one small file is one bundle; spread the work
        | "Convert" >> beam.ParDo(_ConvertFn(options))
        .with_output_types(tuple[int, Any])  # the tagged outcomes would confuse inference
        .with_outputs(_OUTCOMES, main="records"))
    # Every shard index enters the grouping, so empty shards are written too.
    shard_ids = p | "ShardIds" >> beam.Create([(s, None) for s in range(num_shards)])
    written = (
        (converted.records, shard_ids)
        | "AllShards" >> beam.Flatten()
        | "ByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(_WriteShardFn(output_dir, name, split, num_shards)))
    outcomes = converted[_OUTCOMES]
    tally = outcomes | "Tally" >> beam.CombineGlobally(_TallyFn())
    skipped = (outcomes | "Skipped" >> beam.Filter(_has_reason)
               | "SkippedList" >> beam.combiners.ToList())
    counts = written | "ShardCounts" >> beam.combiners.ToList()
    _ = (p
         | "Once" >> beam.Create([None])
         | "WriteSummary" >> beam.Map(
             _write_beam_summary, tally=beam.pvalue.AsSingleton(tally),
             counts=beam.pvalue.AsSingleton(counts), skipped=beam.pvalue.AsSingleton(skipped),
             output_dir=output_dir, meta=meta))
