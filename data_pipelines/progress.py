"""Resuming a conversion: the run's arguments and per-shard completion markers.

A conversion keeps its progress in `OUTPUT_DIR/.progress-NAME-SPLIT/` while it runs:

    listing.jsonl              the listed videos, one JSON object a line (Beam reads it too)
    run.json                   the argument list: name, split, num_shards, inputs, labels,
                               options, class names and the listing's SHA-256
    shard-00003-of-00008.json  written after shard 3 was renamed into place: its record count
                               and the outcome of each of its videos

A conversion started again with the same arguments skips the shards that have a marker (and
their file) without decoding their videos, and builds the summary from the markers of all
shards, so it ends with the same bytes as an uninterrupted run. A different argument list is an
error that names the difference: the shards of two runs never mix. The directory is removed
once `dataset_info.json` is written; a finished conversion run again starts from scratch, as
before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from typing import Any, Iterable, Sequence

from absl import logging
import tensorflow as tf

from data_pipelines import records
from data_pipelines import shards
from data_pipelines import video_records

# The settings that change what a conversion writes. The engine is not one of them: every
# engine writes the same bytes, so a local run may be resumed on Beam and back.
SETTINGS = ("name", "split", "num_shards", "inputs", "labels", "options", "class_names")


class ArgumentsChanged(ValueError):
  """The output directory holds an unfinished conversion with another argument list."""


def directory(output_dir: str, name: str, split: str) -> str:
  return os.path.join(output_dir, f".progress-{name}-{split}")


def listing_path(output_dir: str, name: str, split: str) -> str:
  return os.path.join(directory(output_dir, name, split), "listing.jsonl")


def _marker_path(output_dir: str, name: str, split: str, shard: int, num_shards: int) -> str:
  return os.path.join(directory(output_dir, name, split),
                      f"shard-{shard:05d}-of-{num_shards:05d}.json")


def write_atomic(path: str, text: str) -> None:
  """Writes `text` through a temporary file and a rename: readers never see half a file."""
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _listing_text(items: Sequence[video_records.VideoItem]) -> str:
  return "".join(json.dumps(dataclasses.asdict(it), sort_keys=True) + "\n" for it in items)


def item_from_json(line: str) -> video_records.VideoItem:
  return video_records.VideoItem(**json.loads(line))


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
  """Human-readable differences between two JSON values, by dotted key."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      sub = f"{path}.{key}" if path else key
      if key not in old:
        out.append(f"{sub}: not set in the earlier run, {new[key]!r} now")
      elif key not in new:
        out.append(f"{sub}: {old[key]!r} in the earlier run, not set now")
      else:
        out += _differences(old[key], new[key], sub)
    return out
  return [] if old == new else [f"{path}: {old!r} in the earlier run, {new!r} now"]


def _listing_differences(old_text: str, new_items: Sequence[video_records.VideoItem]
                         ) -> list[str]:
  old = {it.video_id: it for it in map(item_from_json, old_text.splitlines()) if it}
  new = {it.video_id: it for it in new_items}
  out = []
  for what, ids in (("added", sorted(set(new) - set(old))),
                    ("gone", sorted(set(old) - set(new)))):
    if ids:
      out.append(f"listing: {len(ids)} videos {what} ({', '.join(ids[:5])}"
                 f"{', ...' if len(ids) > 5 else ''})")
  changed = [i for i in sorted(set(old) & set(new)) if old[i] != new[i]]
  for i in changed[:5]:
    a, b = dataclasses.asdict(old[i]), dataclasses.asdict(new[i])
    fields = ", ".join(f"{k} {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k])
    out.append(f"listing: video {i!r} changed: {fields}")
  if len(changed) > 5:
    out.append(f"listing: {len(changed) - 5} more videos changed")
  return out


def start(output_dir: str, meta: dict[str, Any], items: Sequence[video_records.VideoItem],
          restart: bool = False) -> tuple[str, set[int]]:
  """Starts or resumes a conversion in `output_dir`.

  Args:
    output_dir: the conversion's output directory (exists).
    meta: the run's settings (`SETTINGS` keys are compared with an earlier run's).
    items: the listed videos with their shards.
    restart: drop an earlier unfinished conversion instead of resuming it.

  Returns:
    (run id, the shards already complete).

  Raises:
    ArgumentsChanged: an unfinished conversion with another argument list is there (and
      `restart` is False). The message names every difference.
  """
  name, split, num_shards = meta["name"], meta["split"], meta["num_shards"]
  progress = directory(output_dir, name, split)
  listing = _listing_text(items)
  run = {k: meta[k] for k in SETTINGS if k in meta}
  run["listing_sha256"] = hashlib.sha256(listing.encode()).hexdigest()
  run = json.loads(json.dumps(run))  # tuples -> lists, as read back from the file
  run_id = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
  run_file = os.path.join(progress, "run.json")
  if tf.io.gfile.exists(run_file) and not restart:
    with tf.io.gfile.GFile(run_file) as f:
      earlier = json.load(f)
    diffs = _differences({k: v for k, v in earlier.items() if k != "listing_sha256"},
                         {k: v for k, v in run.items() if k != "listing_sha256"})
    if earlier.get("listing_sha256") != run["listing_sha256"]:
      with tf.io.gfile.GFile(os.path.join(progress, "listing.jsonl")) as f:
        diffs += _listing_differences(f.read(), items) or ["listing: the same videos, in "
                                                           "another order"]
    if diffs:
      raise ArgumentsChanged(
          f"{output_dir} holds an unfinished conversion with other arguments:\n  "
          + "\n  ".join(diffs) + "\nrun it with the earlier arguments to finish it, or pass "
          "--restart (prepare(restart=True)) to convert from scratch")
    done = set()
    for s in range(num_shards):
      marker = _read_marker(output_dir, name, split, s, num_shards)
      shard_file = os.path.join(output_dir, records.shard_name(name, split, s, num_shards))
      if marker and marker["run"] == run_id and tf.io.gfile.exists(shard_file):
        done.add(s)
    logging.info("resuming the conversion in %s: %d of %d shards complete", output_dir,
                 len(done), num_shards)
    return run_id, done
  if tf.io.gfile.exists(progress):
    tf.io.gfile.rmtree(progress)
  # Shards of an earlier run (maybe with another num_shards) would match the same glob.
  for stale in tf.io.gfile.glob(os.path.join(output_dir, f"{name}-{split}.tfrecord-*")):
    logging.warning("removing %s from an earlier run", stale)
    tf.io.gfile.remove(stale)
  tf.io.gfile.makedirs(progress)
  write_atomic(os.path.join(progress, "listing.jsonl"), listing)
  # Last: a run killed before this line starts from scratch next time.
  write_atomic(run_file, json.dumps(run, indent=1, sort_keys=True))
  return run_id, set()


def _read_marker(output_dir, name, split, shard, num_shards) -> dict[str, Any] | None:
  path = _marker_path(output_dir, name, split, shard, num_shards)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def mark_done(output_dir: str, meta: dict[str, Any], run_id: str, shard: int, count: int,
              outcomes: Iterable[dict[str, Any]]) -> None:
  """Records that `shard` is complete: call after its file was renamed into place.

  Args:
    output_dir: the output directory.
    meta: the run's settings (name, split, num_shards).
    run_id: what `start` returned.
    shard: the shard index.
    count: records written to it.
    outcomes: the outcome of each of its videos (`video_records.process_item`).
  """
  outcomes = sorted(outcomes, key=lambda o: o["video_id"])
  path = _marker_path(output_dir, meta["name"], meta["split"], shard, meta["num_shards"])
  write_atomic(path, json.dumps({"run": run_id, "shard": shard, "records": count,
                                 "outcomes": outcomes}, sort_keys=True))


def finish(output_dir: str, meta: dict[str, Any]) -> None:
  """Writes the summary from every shard's marker, then removes the progress directory.

  Raises:
    RuntimeError: a shard has no marker (it was not written).
  """
  name, split, n = meta["name"], meta["split"], meta["num_shards"]
  tally, counts, skipped = shards.Tally(), {}, []
  for s in range(n):
    marker = _read_marker(output_dir, name, split, s, n)
    if marker is None:
      raise RuntimeError(f"shard {s} of {n} in {output_dir} has no completion marker")
    counts[s] = marker["records"]
    for outcome in marker["outcomes"]:
      tally.add(outcome)
      if outcome["reason"]:
        skipped.append(outcome)
  shards.write_outputs(output_dir, shards.summary(tally, counts, meta), skipped)
  tf.io.gfile.rmtree(directory(output_dir, name, split))
