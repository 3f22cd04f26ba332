"""Listing the inputs: which videos, with which transcript, label, id and shard.

Inputs are a directory walked recursively (transcripts beside the videos, class folders for
labelled sets) or a CSV manifest. Ids are unique in the set, and shard assignment is a pure
function of the listing (round-robin over the videos sorted by id), so every engine agrees
on which video goes to which shard.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import re

import tensorflow as tf

from data_pipelines import decode
from data_pipelines import transcripts
from data_pipelines import video_records

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
LABEL_MODES = ("folders", "csv")


def _find_transcript(stem: str, files: set[str]) -> str | None:
  """The transcript beside a video: `stem.EXT`, else `stem.LANG.EXT` (yt-dlp), English first."""
  for ext in transcripts.EXTENSIONS:
    if stem + ext in files:
      return stem + ext
  tagged = re.compile(re.escape(stem) + r"\.([A-Za-z]{2,3}(?:[-_][A-Za-z0-9]+)*)(\.[a-z]+)$")
  found = []
  for name in files:
    m = tagged.match(name)
    if m and m.group(2) in transcripts.EXTENSIONS and m.group(1).lower() != "info":
      found.append((not m.group(1).lower().startswith("en"),
                    transcripts.EXTENSIONS.index(m.group(2)), name))
  return min(found)[2] if found else None


def _assign(items: list[video_records.VideoItem], num_shards: int, rel: dict[str, str]
            ) -> list[video_records.VideoItem]:
  """Gives each item a unique id and a shard: round-robin over the items sorted by id.

  Round-robin over the sorted listing balances shards (labelled sets of a few hundred videos
  included) and depends on nothing but the listing, so every engine agrees.
  """
  stems = collections.Counter(it.video_id for it in items)
  items = [dataclasses.replace(it, video_id=os.path.splitext(rel[it.video])[0])
           if stems[it.video_id] > 1 else it for it in items]
  ids = collections.Counter(it.video_id for it in items)
  dupes = [i for i, n in ids.items() if n > 1]
  if dupes:
    raise ValueError(f"videos listed more than once: {dupes[:5]}")
  items.sort(key=lambda it: it.video_id)
  return [dataclasses.replace(it, shard=i % num_shards) for i, it in enumerate(items)]


def list_videos(videos_dir: str, num_shards: int, labels: str | None = None
                ) -> tuple[list[video_records.VideoItem], list[str] | None]:
  """Lists the videos under a directory (recursively) with the transcripts beside them.

  Args:
    videos_dir: local or tf.io.gfile directory.
    num_shards: number of output shards.
    labels: None, or "folders" for the DIR/CLASS/video layout (UCF101, HMDB51): the label
      is the index of the class folder's name in the sorted list of class folders.

  Returns:
    (items sorted by video id, each with its shard; class names, or None if unlabelled).
  """
  root = videos_dir.rstrip("/") or "/"
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f"no directory {videos_dir!r}")
  found = []  # (path, path relative to root, transcript path)
  for dirpath, _, filenames in tf.io.gfile.walk(root):
    files = set(filenames)
    subdir = dirpath.rstrip("/")[len(root):].lstrip("/")
    for name in files:
      stem, ext = os.path.splitext(name)
      if ext.lower() in VIDEO_EXTENSIONS:
        transcript = _find_transcript(stem, files)
        found.append((os.path.join(dirpath, name), os.path.join(subdir, name),
                      os.path.join(dirpath, transcript) if transcript else None))
  class_names = None
  if labels == "folders":
    class_names = sorted({rel.split("/")[0] for _, rel, _ in found if "/" in rel})
  elif labels:
    raise ValueError(f"labels={labels!r} needs a manifest; a directory takes 'folders'")
  index = {c: i for i, c in enumerate(class_names or ())}
  items, rel_of = [], {}
  for path, rel, transcript in found:
    label, skip = -1, ""
    if labels == "folders":
      if "/" in rel:
        label = index[rel.split("/")[0]]
      else:
        skip = "no_label"
    stem = os.path.splitext(os.path.basename(path))[0]
    items.append(video_records.VideoItem(path, transcript, stem, label=label, skip=skip))
    rel_of[path] = rel
  return _assign(items, num_shards, rel_of), class_names


def read_manifest(path: str, num_shards: int, labels: str | None = None
                  ) -> tuple[list[video_records.VideoItem], list[str] | None]:
  """Reads a CSV manifest: columns `video`, and optionally `transcript`, `label`, `caption`.

  Relative paths are relative to the manifest's directory; an empty transcript cell means
  none. With `labels="csv"` the label column gives the class: names are mapped to their
  index in the sorted list of names; if every label is a non-negative integer, that integer
  is the label (keeps an official class numbering, e.g. Something-Something v2). A `caption`
  cell (MSR-VTT-style sets) is stored with the video's records for caption retrieval.

  Args:
    path: the CSV file (local or tf.io.gfile).
    num_shards: number of output shards.
    labels: None, or "csv" to read the label column.

  Returns:
    (items sorted by video id, each with its shard; class names, or None).
  """
  with tf.io.gfile.GFile(path) as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or ()]
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
  if "video" not in columns:
    raise ValueError(f"{path}: no 'video' column (columns: {columns})")
  if labels == "csv" and "label" not in columns:
    raise ValueError(f"{path}: labels='csv' but no 'label' column")
  if labels not in (None, "csv"):
    raise ValueError(f"labels={labels!r} with a manifest; use 'csv'")
  base = os.path.dirname(path)

  def resolve(p):
    return p if (os.path.isabs(p) or decode.is_remote(p)) else os.path.join(base, p)

  class_names, index = None, {}
  if labels == "csv":
    names = sorted({r["label"] for r in rows if r.get("label")})
    if all(n.isdigit() for n in names):
      index = {n: int(n) for n in names}
    else:
      class_names = names
      index = {n: i for i, n in enumerate(names)}
  items, rel_of = [], {}
  for row in rows:
    if not row.get("video"):
      continue
    video = resolve(row["video"])
    label, skip = -1, ""
    if labels == "csv":
      label = index.get(row.get("label", ""), -1)
      skip = "" if label >= 0 else "no_label"
    transcript = resolve(row["transcript"]) if row.get("transcript") else None
    stem = os.path.splitext(os.path.basename(video))[0]
    items.append(video_records.VideoItem(video, transcript, stem, label=label, skip=skip,
                                         caption=row.get("caption", "")))
    rel_of[video] = row["video"]
  return _assign(items, num_shards, rel_of), class_names
