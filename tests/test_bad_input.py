"""Bad input not covered next to its module: broken record files in the training stream, a host
left without a readable file, a workdir that cannot be written.

The other rows of the README's bad-input table are tested where the behaviour lives:
test_prepare.py (videos), test_transcripts.py (transcripts), test_input_pipeline.py (a cut file
in evaluation), test_config.py, test_train.py (checkpoints), test_export.py (export files).
"""

import collections
import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import tiny
from data_pipelines import records
from data_pipelines import tokenizer
from tvts_jax import input_pipeline
from tvts_jax import train

FPS = 2.0
DURATION = 8.0  # > the tiny config's span of 4 clips of 1 s with 0.5 s gaps


def _jpeg(seed):
  frame = np.random.default_rng(seed).integers(0, 256, (32, 40, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="JPEG", quality=80)
  return buf.getvalue()


def _record(label):
  """A small valid record whose `label` tells which one it is; a word every 0.25 s."""
  times = np.arange(int(DURATION * FPS)) / FPS
  starts = np.arange(int(DURATION / 0.25)) * 0.25 + 0.01
  return records.VideoRecord(
      video_id=f"v{label}", source="test", duration=DURATION, fps=FPS, height=32, width=40,
      frames=[_jpeg(i) for i in range(len(times))], frame_times=times.tolist(),
      words=[f"w{i % 8}" for i in range(len(starts))], word_starts=starts.tolist(),
      word_ends=(starts + 0.2).tolist(), label=label)


def _write(path, labels):
  with tf.io.TFRecordWriter(str(path)) as w:
    for label in labels:
      w.write(records.serialize(_record(label)))
  return path.read_bytes()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  root = tmp_path_factory.mktemp("spm")
  return tokenizer.train([" ".join(f"w{(i + j) % 8}" for j in range(10)) for i in range(40)],
                         24, str(root / "spm.model"))


@pytest.fixture(scope="module")
def broken_set(tmp_path_factory):
  """Six files: good ones around a cut one, a garbage one, a zero-byte one and one with a
  corrupted record in the middle.

  No dataset_info.json: the pipeline counts the readable records itself.
  """
  d = tmp_path_factory.mktemp("broken")
  _write(d / "a-good.tfrecord", [0, 1, 2, 3])
  whole = _write(d / "b-cut.tfrecord", [4, 5, 6, 7])
  record_size = len(records.serialize(_record(4))) + 16  # TFRecord framing: 16 bytes
  # Two whole records, then half of the third: a copy or upload that stopped in the middle.
  (d / "b-cut.tfrecord").write_bytes(whole[:2 * record_size + record_size // 2])
  (d / "c-garbage.tfrecord").write_bytes(np.random.default_rng(0).bytes(3000))
  (d / "d-empty.tfrecord").write_bytes(b"")
  _write(d / "e-good.tfrecord", [8, 9, 10, 11])
  # A flipped byte inside the second record (a bad disk or copy): its checksum fails. A
  # TFRecord reader cannot trust the framing after that, so the file ends there, like a cut.
  flipped = bytearray(_write(d / "f-bitflip.tfrecord", [12, 13, 14, 15]))
  flipped[record_size + record_size // 2] ^= 0xFF
  (d / "f-bitflip.tfrecord").write_bytes(bytes(flipped))
  return str(d / "*.tfrecord")


# Whole files, and the records before the damage in the others.
GOOD_LABELS = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12]


def _train_iterator(config, pattern, spm, start_step=0):
  return input_pipeline.make_train_iterator(config, pattern, spm, start_step=start_step,
                                            process_index=0, process_count=1)


def test_broken_record_files_cost_only_their_own_records(broken_set, spm):
  config = tiny.get_config()  # batch 8
  it = _train_iterator(config, broken_set, spm)
  # 11 readable records per epoch: 11 batches of 8 are exactly 8 epochs.
  batches = [next(it) for _ in range(11)]
  seen = collections.Counter(np.concatenate([b["label"] for b in batches]).tolist())
  assert seen == {label: 8 for label in GOOD_LABELS}
  # The position in the stream stays a function of the step: resuming skips exactly the
  # readable records (counted by reading, past the cut).
  resumed = next(_train_iterator(config, broken_set, spm, start_step=3))
  for key in ("label", "order", "text_ids", "video"):
    np.testing.assert_array_equal(resumed[key], batches[3][key])

  config.data.skip_corrupt_files = False  # the strict mode: the first broken file stops the run
  strict = _train_iterator(config, broken_set, spm)
  with pytest.raises(tf.errors.DataLossError):
    for _ in range(11):
      next(strict)


def test_host_without_a_readable_file_fails_instead_of_waiting_forever(tmp_path, spm):
  (tmp_path / "a.tfrecord").write_bytes(np.random.default_rng(1).bytes(500))
  (tmp_path / "b.tfrecord").write_bytes(b"")
  good = tmp_path / "good"
  good.mkdir()
  _write(good / "c.tfrecord", [0])
  config = tiny.get_config()
  with pytest.raises(ValueError, match="none of this host's 2 record files has a readable"):
    _train_iterator(config, str(tmp_path / "*.tfrecord"), spm)
  # With two hosts, only the host whose slice is all bad fails (files[i::2]: a, c | b).
  pattern = f"{tmp_path}/a.tfrecord,{tmp_path}/b.tfrecord,{good}/c.tfrecord"
  input_pipeline.make_train_iterator(config, pattern, spm, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="none of this host's 1 record files"):
    input_pipeline.make_train_iterator(config, pattern, spm, process_index=1, process_count=2)


@pytest.mark.parametrize("kind", ["parent_is_a_file", "read_only_dir"])
def test_unwritable_workdir_is_a_clear_error_before_any_work(tmp_path, kind):
  if kind == "parent_is_a_file":
    (tmp_path / "file").write_text("not a directory")
    workdir = str(tmp_path / "file" / "run")
  elif os.geteuid() != 0:
    os.chmod(tmp_path, 0o500)
    workdir = str(tmp_path)
  else:  # root writes through permission bits; nobody can create files in /proc
    workdir = "/proc"
  config = tiny.get_config()
  config.data.train_records = str(tmp_path / "never-read-*")  # fails before the data
  config.data.tokenizer = "never-read.model"
  try:
    with pytest.raises(OSError, match=f"workdir '{workdir}' is not writable"):
      train.train_and_evaluate(config, workdir)
  finally:
    os.chmod(tmp_path, 0o700)
