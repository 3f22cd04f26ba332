"""Counting and writing: the shards, the summary (`dataset_info.json`) and `skipped.jsonl`.

Both engines write through these functions. A shard is written under a temporary name and
renamed, so a retried or killed writer never leaves half a shard under the final name. The
tally is exact whatever order outcomes are added and merged in (Beam combines freely), so
every engine writes the same summary.
"""

from __future__ import annotations

import collections
import json
import os
import uuid
from typing import Any, Iterable

import tensorflow as tf

from data_pipelines import records

SKIPPED_FILE = "skipped.jsonl"


class Tally:
  """Counts over outcomes; mergeable, and exact whatever the order (Beam combines freely)."""

  def __init__(self):
    self.videos = self.kept = self.records = self.words = self.words_past_end = 0
    self.asr_transcripts = 0  # kept videos whose words came from our speech recognition
    self.milliseconds = 0  # integer, so that sums do not depend on the order
    self.skipped = collections.Counter()
    self.transcripts_ignored = collections.Counter()

  def add(self, outcome: dict[str, Any]) -> Tally:
    self.videos += 1
    if outcome["reason"]:
      self.skipped[outcome["reason"]] += 1
      return self
    self.kept += 1
    self.records += outcome["records"]
    self.milliseconds += round(outcome["seconds"] * 1000)
    self.words += outcome["words"]
    self.words_past_end += outcome["words_past_end"]
    if outcome["transcript_ignored"]:
      self.transcripts_ignored[outcome["transcript_ignored"]] += 1
    self.asr_transcripts += bool(outcome.get("asr"))
    return self

  def merge(self, other: Tally) -> Tally:
    for key in ("videos", "kept", "records", "words", "words_past_end", "milliseconds",
                "asr_transcripts"):
      setattr(self, key, getattr(self, key) + getattr(other, key))
    self.skipped.update(other.skipped)
    self.transcripts_ignored.update(other.transcripts_ignored)
    return self


def summary(tally: Tally, shard_counts: dict[int, int], meta: dict[str, Any]
            ) -> dict[str, Any]:
  """The summary of a run, as written to `dataset_info.json`.

  Args:
    tally: counts over every video's outcome.
    shard_counts: shard index -> records written; a missing index wrote none.
    meta: the run's settings (name, split, num_shards, engine, inputs, options, ...).

  Returns:
    `meta` plus the shard files, their record counts and the tally's counts.

  Raises:
    RuntimeError: the shards hold another number of records than were converted.
  """
  n = meta["num_shards"]
  files = [records.shard_name(meta["name"], meta["split"], i, n) for i in range(n)]
  per_shard = [shard_counts.get(i, 0) for i in range(n)]
  if sum(per_shard) != tally.records:
    raise RuntimeError(f"wrote {sum(per_shard)} records but converted {tally.records}")
  return {
      **meta,
      "files": files,
      # File name -> records, the key the input pipeline reads to size and resume a stream.
      "shard_counts": dict(zip(files, per_shard)),
      "videos": tally.videos,
      "kept_videos": tally.kept,
      "skipped_videos": sum(tally.skipped.values()),
      "skipped": dict(sorted(tally.skipped.items())),
      "num_records": tally.records,
      "hours": round(tally.milliseconds / 3.6e6, 4),
      "words": tally.words,
      "words_past_end": tally.words_past_end,
      "transcripts_ignored": dict(sorted(tally.transcripts_ignored.items())),
      "asr_transcripts": tally.asr_transcripts,
  }


def write_outputs(output_dir: str, info: dict[str, Any], skipped: Iterable[dict[str, Any]]):
  """Writes `skipped.jsonl` (sorted by video, so any engine writes the same bytes) and the
  summary `info` as `dataset_info.json`."""
  lines = [json.dumps({k: o[k] for k in ("video", "video_id", "reason", "detail")},
                      sort_keys=True)
           for o in sorted(skipped, key=lambda o: (o["video"], o["video_id"]))]
  with tf.io.gfile.GFile(os.path.join(output_dir, SKIPPED_FILE), "w") as f:
    f.write("".join(line + "\n" for line in lines))
  records.write_info(output_dir, info)


def write_shard(output_dir: str, name: str, split: str, index: int, num_shards: int,
                serialized: Iterable[bytes]) -> int:
  """Writes one shard through a temporary file, so a retried or killed writer leaves no
  half-written shard under the final name. Returns the number of records."""
  path = os.path.join(output_dir, records.shard_name(name, split, index, num_shards))
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  count = 0
  with tf.io.TFRecordWriter(tmp) as writer:
    for record in serialized:
      writer.write(record)
      count += 1
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return count


def format_summary(info: dict[str, Any]) -> str:
  """A printable table of a summary: kept, skipped by reason, records and shards."""
  rows = [("videos", info["videos"]),
          ("kept", f"{info['kept_videos']}  ({info['num_records']} records, "
                   f"{info['hours']:.2f} h, {info['words']} words)")]
  rows += [(f"skipped: {reason}", n) for reason, n in info["skipped"].items()]
  if info["words_past_end"]:
    rows.append(("words past the video end (dropped)", info["words_past_end"]))
  rows += [(f"transcript ignored: {r}", n) for r, n in info["transcripts_ignored"].items()]
  if info.get("asr_transcripts"):
    rows.append(("transcripts from our ASR", info["asr_transcripts"]))
  per = list(info["shard_counts"].values())
  rows.append(("shards", f"{len(per)} files, {min(per)}-{max(per)} records each"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
