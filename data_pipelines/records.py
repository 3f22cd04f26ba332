"""The TFRecord schema of tvts-jax: one place that writes and parses a video record.

One `tf.train.Example` holds one video, or one window of a long video (so that records stay
bounded in size). Times are seconds from the start of the record's window.

| feature          | type          | meaning                                               |
|------------------|---------------|-------------------------------------------------------|
| `video_id`       | bytes         | id, unique in the set (`stem` or `stem@window`)        |
| `source`         | bytes         | path of the source video                              |
| `start_time`     | float         | where the window starts in the source video (s)       |
| `duration`       | float         | window length (s)                                     |
| `fps`            | float         | rate the frames were stored at                        |
| `height`,`width` | int64         | stored frame size (short side = the prepare option)   |
| `frames`         | bytes list    | JPEG frames, chronological                            |
| `frame_times`    | float list    | timestamp of each frame (s)                           |
| `words`          | bytes list    | ASR words (UTF-8)                                     |
| `word_starts`    | float list    | start time of each word (s)                           |
| `word_ends`      | float list    | end time of each word (s)                             |
| `label`          | int64         | video class for labelled sets, -1 otherwise           |
| `segment_labels` | int64 list    | action label of each annotated segment (may be empty) |
| `segment_starts` | float list    | segment start times (s)                               |
| `segment_ends`   | float list    | segment end times (s)                                 |
| `transcript_asr` | bytes         | `BACKEND:MODEL` when the words came from our speech   |
|                  |               | recognition (`prepare --asr`, `transcribe`), else ""  |
| `caption`        | bytes         | a caption of the whole video (a labelled set's manifest |
|                  |               | `caption` column: MSR-VTT-style retrieval), else ""   |

`transcript_asr` and `caption` are optional (records written before them read as ""), so the
schema version did not change.

Next to the shards, `dataset_info.json` holds the counts, the options used and
`SCHEMA_VERSION`; readers check the version.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

SCHEMA_VERSION = 1
INFO_FILE = "dataset_info.json"


@dataclasses.dataclass
class VideoRecord:
  """One record before serialisation. `frames` are JPEG bytes."""
  video_id: str
  source: str
  duration: float
  fps: float
  height: int
  width: int
  frames: Sequence[bytes]
  frame_times: Sequence[float]
  words: Sequence[str]
  word_starts: Sequence[float]
  word_ends: Sequence[float]
  start_time: float = 0.0
  label: int = -1
  segment_labels: Sequence[int] = ()
  segment_starts: Sequence[float] = ()
  segment_ends: Sequence[float] = ()
  transcript_asr: str = ""
  caption: str = ""


def _bytes(values):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _floats(values):
  return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _ints(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def serialize(r: VideoRecord) -> bytes:
  """Serialises a record to `tf.train.Example` bytes, checking its invariants."""
  if len(r.frames) != len(r.frame_times):
    raise ValueError(f"{r.video_id}: {len(r.frames)} frames but {len(r.frame_times)} times")
  if not len(r.words) == len(r.word_starts) == len(r.word_ends):
    raise ValueError(f"{r.video_id}: words, word_starts and word_ends differ in length")
  if not len(r.segment_labels) == len(r.segment_starts) == len(r.segment_ends):
    raise ValueError(f"{r.video_id}: segment fields differ in length")
  feature = {
      "video_id": _bytes([r.video_id.encode()]),
      "source": _bytes([r.source.encode()]),
      "start_time": _floats([r.start_time]),
      "duration": _floats([r.duration]),
      "fps": _floats([r.fps]),
      "height": _ints([r.height]),
      "width": _ints([r.width]),
      "frames": _bytes(r.frames),
      "frame_times": _floats(r.frame_times),
      "words": _bytes(w.encode() for w in r.words),
      "word_starts": _floats(r.word_starts),
      "word_ends": _floats(r.word_ends),
      "label": _ints([r.label]),
      "segment_labels": _ints(r.segment_labels),
      "segment_starts": _floats(r.segment_starts),
      "segment_ends": _floats(r.segment_ends),
      "transcript_asr": _bytes([r.transcript_asr.encode()]),
      "caption": _bytes([r.caption.encode()]),
  }
  # Deterministic: protobuf writes map entries in a per-process order otherwise, and the local
  # and Beam converters must write byte-identical shards.
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
      deterministic=True)


_SCALARS = {
    "video_id": tf.io.FixedLenFeature([], tf.string),
    "source": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "start_time": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    "duration": tf.io.FixedLenFeature([], tf.float32),
    "fps": tf.io.FixedLenFeature([], tf.float32),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "transcript_asr": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "caption": tf.io.FixedLenFeature([], tf.string, default_value=""),
}
_LISTS = {
    "frames": tf.string, "frame_times": tf.float32,
    "words": tf.string, "word_starts": tf.float32, "word_ends": tf.float32,
    "segment_labels": tf.int64, "segment_starts": tf.float32, "segment_ends": tf.float32,
}
FEATURES = {**_SCALARS, **{k: tf.io.RaggedFeature(dtype) for k, dtype in _LISTS.items()}}


def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Parses one serialised record (inside tf.data) into dense tensors."""
  return tf.io.parse_single_example(serialized, FEATURES)


def parse_numpy(serialized: bytes) -> dict[str, Any]:
  """Parses one record eagerly into numpy values (tests, inspection)."""
  out = {}
  for k, v in parse(tf.constant(serialized)).items():
    v = v.numpy()
    out[k] = v.decode() if isinstance(v, bytes) else v
  out["words"] = [w.decode() for w in out["words"]]
  out["frames"] = list(out["frames"])
  return out


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
  """`NAME-SPLIT.tfrecord-00000-of-00064`."""
  return f"{name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def write_info(output_dir: str, info: dict[str, Any]) -> str:
  """Writes `dataset_info.json` (adds the schema version); returns its path."""
  path = os.path.join(output_dir, INFO_FILE)
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump({"schema_version": SCHEMA_VERSION, **info}, f, indent=2, sort_keys=True,
              default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
  return path


def read_info(directory: str) -> dict[str, Any]:
  """Reads and version-checks `dataset_info.json` of a record directory."""
  path = os.path.join(directory, INFO_FILE)
  with tf.io.gfile.GFile(path) as f:
    info = json.load(f)
  if info.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(f"{path}: schema version {info.get('schema_version')}, this code reads "
                     f"{SCHEMA_VERSION}; re-run data_pipelines.prepare")
  return info
