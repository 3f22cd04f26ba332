"""The tf.data pipeline: the batch contract, the sampling recipe, determinism, resume, hosts."""
import dataclasses
import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import tiny
from data_pipelines import records
from data_pipelines import synthetic
from data_pipelines import tokenizer
from tvts_jax import input_pipeline, sampling

FPS = 10.0
WORD_DT = 0.25  # hand-made records: one word every WORD_DT seconds, named by its index


def _gradient_jpeg(index, height, width):
  """A frame whose pixels encode (frame index, x, y): R = 8 index, G = 2 x, B = 2 y."""
  y, x = np.mgrid[0:height, 0:width]
  frame = np.stack([np.full_like(x, 8 * index), 2 * x, 2 * y], -1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="JPEG", quality=95, subsampling=0)
  return buf.getvalue()


def _hand_record(label, duration=12.0, height=32, width=48, words=True, fps=FPS):
  """A record with gradient frames and words w0, w1, ... every WORD_DT seconds."""
  times = np.arange(int(duration * fps)) / fps
  n_words = int(duration / WORD_DT) if words else 0
  starts = np.arange(n_words) * WORD_DT + 0.01
  return records.VideoRecord(
      video_id=f"hand-{label}", source="hand", duration=duration, fps=fps, height=height,
      width=width, frames=[_gradient_jpeg(i % 32, height, width) for i in range(len(times))],
      frame_times=times.tolist(), words=[f"w{i}" for i in range(n_words)],
      word_starts=starts.tolist(), word_ends=(starts + 0.2).tolist(), label=label,
      segment_labels=[label % 5, (label + 1) % 5], segment_starts=[0.0, duration / 2],
      segment_ends=[duration / 2, duration])


def _write(directory, name, recs):
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  with tf.io.TFRecordWriter(path) as w:
    for r in recs:
      w.write(records.serialize(r))
  return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  syn = str(root / "synthetic")
  synthetic.generate(syn, 24, seed=0, split="train", num_shards=4, short_side=32,
                     verbose=False)
  # Hand-made records, 4 files x 4 records, labels 0..15; no dataset_info.json (the pipeline
  # then counts records itself).
  hand = str(root / "hand")
  for f in range(4):
    _write(hand, f"hand-{f}.tfrecord", [_hand_record(4 * f + i) for i in range(4)])
  sentences = list(tokenizer.iter_transcripts(os.path.join(syn, "*.tfrecord*")))
  sentences += [" ".join(f"w{i}" for i in range(j, j + 10)) for j in range(0, 60, 3)]
  spm = tokenizer.train(sentences, 128, str(root / "spm.model"))
  return dict(synthetic=os.path.join(syn, "*.tfrecord*"), hand=os.path.join(hand, "*"),
              hand_dir=hand, tokenizer=spm, root=root)


def _config(**data):
  c = tiny.get_config()
  c.data.update(data)
  return c


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _sample(record, config, seed):
  opts = sampling.options(config)  # pylint: disable=protected-access
  out = sampling.sample_example(records.parse(tf.constant(records.serialize(record))),
                                      tf.constant([seed, 7], tf.int64), opts)
  return {k: v.numpy() for k, v in out.items()}


def test_batch_contract(data):
  c = _config()
  it = input_pipeline.make_train_iterator(c, data["synthetic"], data["tokenizer"],
                                          process_index=0, process_count=1)
  batch = next(it)
  b, k, t, s, l = 8, c.data.num_clips, c.data.num_frames, c.data.image_size, c.data.text_len
  expected = dict(video=(np.uint8, (b, t, s, s, 3)), text_ids=(np.int32, (b, k, l)),
                  text_mask=(np.bool_, (b, k, l)), order=(np.int32, (b, k)),
                  valid=(np.bool_, (b,)), clip_labels=(np.int32, (b, k)),
                  label=(np.int32, (b,)))
  assert set(batch) == set(expected) == set(input_pipeline.BATCH_KEYS)
  for key, (dtype, shape) in expected.items():
    assert batch[key].dtype == dtype, key
    assert batch[key].shape == shape, key
  # Nearly every synthetic visit finds a span with words in each of its 1-s clips.
  assert batch["valid"].sum() >= 6
  np.testing.assert_array_equal(np.sort(batch["order"], 1), np.tile(np.arange(k), (b, 1)))
  np.testing.assert_array_equal(batch["text_ids"][:, :, 0], tokenizer.BOS_ID)
  np.testing.assert_array_equal(batch["text_mask"], batch["text_ids"] != tokenizer.PAD_ID)
  assert ((batch["clip_labels"] >= -1) & (batch["clip_labels"] < 9)).all()
  assert (batch["clip_labels"] >= 0).any()
  np.testing.assert_array_equal(batch["label"], -1)
  assert batch["video"].max() > 100  # bright objects on a dark background, not zeros


def test_words_of_each_clip_are_those_whose_start_falls_in_it():
  c = _config(clip_seconds=(1.5, 2.0), gap_seconds=0.5, num_frames=4)
  record = _hand_record(0, duration=12.0)
  word_starts = np.asarray(record.word_starts, np.float32)
  seen_lengths = set()
  for seed in range(6):
    out = _sample(record, c, seed)
    start, clip_len = out["span_start"], out["clip_len"]
    seen_lengths.add(float(clip_len))
    span = 4 * clip_len + 3 * 0.5
    assert 0.0 <= start and start + span <= record.duration + 1e-5
    np.testing.assert_allclose(out["clip_starts"], start + np.arange(4) * (clip_len + 0.5),
                               rtol=1e-6)
    for i in range(4):
      a = np.float32(out["clip_starts"][i])
      b = a + np.float32(clip_len)
      expected = [w for w, t in zip(record.words, word_starts) if a <= t < b]
      assert out["clip_texts"][i].decode() == " ".join(expected)
      assert len(expected) >= 5
    for k in range(4):  # shuffled transcripts follow `order`
      assert out["texts"][k] == out["clip_texts"][out["order"][k]]
    assert out["valid"]
  assert seen_lengths == {1.5, 2.0}


def test_frames_one_per_segment_chronological_inside_span():
  c = _config(num_frames=8, clip_seconds=(2.0,), gap_seconds=1.0)
  record = _hand_record(0, duration=20.0)
  times = np.asarray(record.frame_times)
  for seed in range(5):
    out = _sample(record, c, seed)
    span = 4 * 2.0 + 3 * 1.0
    seg = span / 8
    t = times[out["frame_index"]]
    assert (np.diff(t) > 0).all()
    half_frame = 0.5 / FPS + 1e-4  # nearest stored frame to a time inside the segment
    for j in range(8):
      assert out["span_start"] + j * seg - half_frame <= t[j]
      assert t[j] <= out["span_start"] + (j + 1) * seg + half_frame
    # The decoded frames are those frames (their red channel encodes the index).
    np.testing.assert_allclose(out["video"][..., 0].mean((1, 2)) / 8,
                               out["frame_index"] % 32, atol=0.5)


@pytest.mark.parametrize("stored_short", [32, 64])
def test_one_crop_shared_by_all_frames(stored_short):
  # stored_short == resize_short: decode_and_crop; 64: decoded, resized by 1/2, cropped.
  c = _config(image_size=24, resize_short=32, num_frames=4)
  scale = stored_short // 32
  record = _hand_record(0, height=stored_short, width=stored_short * 3 // 2)
  crops = set()
  for seed in range(6):
    out = _sample(record, c, seed)
    y0, x0 = out["crop"]
    crops.add((int(y0), int(x0)))
    assert 0 <= y0 <= 32 - 24 and 0 <= x0 <= 48 - 24
    video = out["video"].astype(np.float32)
    assert video.shape == (4, 24, 24, 3)
    # Pixel (r, q) of every frame comes from resized position (y0 + r, x0 + q), i.e. from
    # stored pixels scale * (y0 + r) + (scale - 1) / 2 (the average of scale x scale pixels).
    cols = 2 * (scale * (x0 + np.arange(24)) + (scale - 1) / 2)
    rows = 2 * (scale * (y0 + np.arange(24)) + (scale - 1) / 2)
    for frame in video:
      np.testing.assert_allclose(frame[..., 1], np.tile(cols, (24, 1)), atol=4)
      np.testing.assert_allclose(frame[..., 2], np.tile(rows[:, None], (1, 24)), atol=4)
  assert len(crops) > 1


def test_clip_labels_follow_segment_overlap():
  c = _config(clip_seconds=(2.0,), gap_seconds=1.0)
  record = _hand_record(3, duration=12.0)  # segments [0, 6) label 3, [6, 12) label 4
  for seed in range(5):
    out = _sample(record, c, seed)
    starts = out["clip_starts"]
    ends = starts + 2.0
    overlap_first = np.maximum(np.minimum(ends, 6.0) - starts, 0)
    overlap_second = np.maximum(ends - np.maximum(starts, 6.0), 0)
    expected = np.where(overlap_first >= overlap_second, 3, 4)
    np.testing.assert_array_equal(out["clip_labels"], expected)


def test_transcripts_in_batch_are_permuted_by_order(data, tmp_path):
  # One record: every example of the stream is a visit of it, with its own span and order.
  path = _write(str(tmp_path), "one.tfrecord", [_hand_record(0, duration=14.0)])
  c = _config(text_len=64, clip_seconds=(1.5,), gap_seconds=0.5)
  batch = next(input_pipeline.make_train_iterator(c, path, data["tokenizer"],
                                                  process_index=0, process_count=1))
  tok = tokenizer.load(data["tokenizer"])
  for b in range(8):
    by_clip = {}
    for k in range(4):
      text = tok.decode(batch["text_ids"][b, k])
      by_clip[int(batch["order"][b, k])] = [int(w[1:]) for w in text.split()]
    indices = [by_clip[i] for i in range(4)]
    for i in range(4):
      assert indices[i] == list(range(indices[i][0], indices[i][-1] + 1))  # contiguous
      assert len(indices[i]) == 6  # 1.5 s of words every 0.25 s
    for i in range(3):  # clip i + 1 starts 2 s (8 words) after clip i
      assert indices[i + 1][0] - indices[i][0] == 8


def test_examples_without_words_are_invalid_and_counted(data, tmp_path):
  recs = [_hand_record(i, words=i % 2 == 0) for i in range(6)]
  recs.append(_hand_record(6, duration=3.0))  # shorter than the span
  recs.append(_hand_record(7))
  path = _write(str(tmp_path), "mixed.tfrecord", recs)
  c = _config()
  it = input_pipeline.make_train_iterator(c, path, data["tokenizer"], process_index=0,
                                          process_count=1)
  batch = next(it)
  expected_valid = (batch["label"] % 2 == 0) & (batch["label"] != 6) | (batch["label"] == 7)
  np.testing.assert_array_equal(batch["valid"], expected_valid)
  assert sorted(batch["label"]) == list(range(8))  # one epoch, still one example per record
  assert not batch["video"][~batch["valid"]].any()
  assert it.num_examples == 8 and it.num_invalid == 4 and it.valid_rate == 0.5


def test_short_video_span_shortened_as_the_reference_does():
  # 6 s is shorter than the only span (4 x 2 s + 3 x 0.5 s = 9.5 s): the span becomes
  # [0, 5] cut into 4 clips with the same 0.5 s gaps, (5 - 1.5) / 4 = 0.875 s each.
  c = _config(clip_seconds=(2.0,), gap_seconds=0.5, num_frames=8)
  record = _hand_record(0, duration=6.0)
  word_starts = np.asarray(record.word_starts, np.float32)
  times = np.asarray(record.frame_times)
  for seed in range(3):
    out = _sample(record, c, seed)
    assert out["shortened"] and out["valid"]
    assert out["clip_len"] == pytest.approx(0.875)
    np.testing.assert_allclose(out["clip_starts"], np.arange(4) * 1.375, atol=1e-6)
    for i in range(4):
      a = np.float32(out["clip_starts"][i])
      expected = [w for w, t in zip(record.words, word_starts) if a <= t < a + np.float32(0.875)]
      assert expected and out["clip_texts"][i].decode() == " ".join(expected)
    t = times[out["frame_index"]]
    assert (np.diff(t) > 0).all() and t[0] >= 0 and t[-1] <= 5.0 + 0.5 / FPS
  assert not _sample(_hand_record(0, duration=12.0), c, 0)["shortened"]
  # Too short for 4 clips and their gaps at all ((2.5 - 1 - 1.5) / 4 = 0): invalid.
  out = _sample(_hand_record(0, duration=2.5), c, 0)
  assert out["shortened"] and not out["valid"]
  # A config may still ask for a minimum, applied when reading.
  c.data.min_video_seconds = 7.0
  assert not _sample(record, c, 0)["valid"]
  assert _sample(_hand_record(0, duration=12.0), c, 0)["valid"]


def test_shortened_examples_counted_not_batched(data, tmp_path):
  recs = [_hand_record(i, duration=6.0 if i % 4 == 0 else 12.0) for i in range(8)]
  path = _write(str(tmp_path), "short.tfrecord", recs)
  c = _config(clip_seconds=(2.0,), gap_seconds=0.5)
  it = input_pipeline.make_train_iterator(c, path, data["tokenizer"], process_index=0,
                                          process_count=1)
  batches = _take(it, 2)
  assert set(batches[0]) == set(input_pipeline.BATCH_KEYS)
  assert it.num_shortened == 4 and it.num_invalid == 0  # labels 0 and 4, twice
  resumed = input_pipeline.make_train_iterator(c, path, data["tokenizer"], start_step=1,
                                               process_index=0, process_count=1)
  _assert_batches_equal(next(resumed), batches[1])
  assert resumed.num_shortened == 2


def test_same_step_same_batch_different_steps_differ(data):
  c = _config()
  args = (c, data["synthetic"], data["tokenizer"])
  a = _take(input_pipeline.make_train_iterator(*args, process_index=0, process_count=1), 2)
  b = _take(input_pipeline.make_train_iterator(*args, process_index=0, process_count=1), 2)
  for x, y in zip(a, b):
    _assert_batches_equal(x, y)
  assert not np.array_equal(a[0]["video"], a[1]["video"])
  c.seed = 1
  other = next(input_pipeline.make_train_iterator(c, data["synthetic"], data["tokenizer"],
                                                  process_index=0, process_count=1))
  assert not np.array_equal(a[0]["video"], other["video"])


@pytest.mark.parametrize("which,steps", [("synthetic", (2, 3, 7)), ("hand", (3,))])
def test_resume_equals_uninterrupted_stream(data, which, steps):
  # 24 synthetic records = 3 batches of 8 per epoch: step 3 starts epoch 1 and step 7 is in
  # epoch 2 (skipped arithmetically from shard_counts). The hand set has no dataset_info.json.
  c = _config()
  full = _take(input_pipeline.make_train_iterator(c, data[which], data["tokenizer"],
                                                  process_index=0, process_count=1),
               max(steps) + 1)
  for step in steps:
    resumed = input_pipeline.make_train_iterator(c, data[which], data["tokenizer"],
                                                 start_step=step, process_index=0,
                                                 process_count=1)
    _assert_batches_equal(next(resumed), full[step])


def test_hosts_read_disjoint_files_covering_all(data):
  files = input_pipeline.list_files(data["hand"])
  assert len(files) == 4
  slices = [input_pipeline.host_files(files, i, 3) for i in range(3)]
  assert sorted(sum(slices, [])) == files
  assert all(not set(a) & set(b) for i, a in enumerate(slices) for b in slices[i + 1:])
  with pytest.raises(ValueError, match="every host needs at least one file"):
    input_pipeline.host_files(files, 0, 5)

  c = _config()  # batch 8 over 2 hosts: 4 per host; 8 records per host = 2 steps per epoch
  labels = []
  for host in range(2):
    it = input_pipeline.make_train_iterator(c, data["hand"], data["tokenizer"],
                                            process_index=host, process_count=2)
    batches = _take(it, 2)
    assert batches[0]["video"].shape[0] == 4
    labels.append(set(np.concatenate([b["label"] for b in batches]).tolist()))
  assert not labels[0] & labels[1]
  assert labels[0] | labels[1] == set(range(16))
  with pytest.raises(ValueError, match="not divisible"):
    input_pipeline.make_train_iterator(c, data["hand"], data["tokenizer"], process_index=0,
                                       process_count=3)


def test_eval_is_fixed_padded_and_host_independent(data):
  c = _config(eval_batches=3, eval_batch_size=8)  # 24 slots for 16 records
  ev = input_pipeline.make_eval_iterator(c, data["hand"], data["tokenizer"], process_index=0,
                                         process_count=1)
  first, second = list(ev), list(ev)
  assert len(ev) == 3 and len(first) == 3 and len(second) == 3
  for x, y in zip(first, second):
    _assert_batches_equal(x, y)
  valid = np.concatenate([b["valid"] for b in first])
  labels = np.concatenate([b["label"] for b in first])
  assert sorted(labels[valid]) == list(range(16))
  assert not valid[16:].any() and (labels[16:] == -1).all()
  assert not first[2]["video"].any()

  # Each record's clips depend on the record, not on how many hosts share the set.
  by_label = {int(l): i for i, l in enumerate(labels) if l >= 0}
  videos = np.concatenate([b["video"] for b in first])
  for host in range(2):
    c2 = _config(eval_batches=1, eval_batch_size=16)
    (batch,) = list(input_pipeline.make_eval_iterator(
        c2, data["hand"], data["tokenizer"], process_index=host, process_count=2))
    assert batch["valid"].all()
    for label, video in zip(batch["label"], batch["video"]):
      np.testing.assert_array_equal(video, videos[by_label[int(label)]])

  c3 = _config(eval_batches=1, eval_batch_size=8)  # fewer slots than records: truncated
  (batch,) = list(input_pipeline.make_eval_iterator(c3, data["hand"], data["tokenizer"],
                                                    process_index=0, process_count=1))
  assert batch["valid"].all()


def test_truncated_file_is_skipped_not_the_others(data, tmp_path):
  for name in sorted(os.listdir(data["hand_dir"])):
    with open(os.path.join(data["hand_dir"], name), "rb") as f:
      content = f.read()
    if name == "hand-1.tfrecord":  # labels 4..7: keep 2 whole records, cut the third
      sizes = [len(records.serialize(_hand_record(4 + i))) + 16 for i in range(4)]
      content = content[:sizes[0] + sizes[1] + sizes[2] // 2]
    with open(tmp_path / name, "wb") as f:
      f.write(content)
  pattern = str(tmp_path / "*")
  c = _config(eval_batches=2, eval_batch_size=8)
  batches = list(input_pipeline.make_eval_iterator(c, pattern, data["tokenizer"],
                                                   process_index=0, process_count=1))
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels[labels >= 0]) == [0, 1, 2, 3, 4, 5] + list(range(8, 16))
  c.data.skip_corrupt_files = False
  with pytest.raises(tf.errors.DataLossError):
    list(input_pipeline.make_eval_iterator(c, pattern, data["tokenizer"], process_index=0,
                                           process_count=1))


def test_measure_throughput(data):
  result = input_pipeline.measure_throughput(_config(), data["synthetic"], data["tokenizer"],
                                             num_batches=2, warmup_batches=1)
  assert result["clips_per_s"] > 0 and result["batch_size"] == 8
  assert result["clips_per_s_per_core"] == pytest.approx(result["clips_per_s"] /
                                                         result["cores"])


# --- data.samples_per_visit: N examples from one record read ---------------------------------


def _sample_n(record, config, seed, n):
  out = sampling.sample_examples(records.parse(tf.constant(records.serialize(record))),
                                 tf.constant([seed, 7], tf.int64), sampling.options(config), n)
  return {k: v.numpy() for k, v in out.items()}


def _check_example(out, j, record, config, scale=1):
  """Example j of a visit is a valid TVTS example of `record` (hand-made gradient frames)."""
  d = config.data
  k, t, s = d.num_clips, d.num_frames, d.image_size
  start, clip_len = out["span_start"][j], out["clip_len"][j]
  span = k * clip_len + (k - 1) * d.gap_seconds
  assert out["valid"][j] and 0.0 <= start and start + span <= record.duration + 1e-5
  # Its frames lie in its span, one per segment, chronological.
  times = np.asarray(record.frame_times)[out["frame_index"][j]]
  half_frame = 0.5 / FPS + 1e-4
  assert (np.diff(times) > 0).all()
  assert start - half_frame <= times[0] and times[-1] <= start + span + half_frame
  # Its words are those starting in its clips.
  word_starts = np.asarray(record.word_starts, np.float32)
  for i in range(k):
    a = np.float32(out["clip_starts"][j][i])
    b = a + np.float32(clip_len)
    assert out["clip_texts"][j][i].decode() == " ".join(
        w for w, ws in zip(record.words, word_starts) if a <= ws < b)
  for i in range(k):
    assert out["texts"][j][i] == out["clip_texts"][j][out["order"][j][i]]
  # Its pixels are its frames (red = 8 x frame index) at its own crop (green = 2 x column,
  # blue = 2 x row of the resized frame), even where another example decoded the frame.
  video = out["video"][j].astype(np.float32)
  assert video.shape == (t, s, s, 3)
  np.testing.assert_allclose(video[..., 0].mean((1, 2)) / 8, out["frame_index"][j] % 32,
                             atol=0.5)
  y0, x0 = out["crop"][j]
  cols = 2 * (scale * (x0 + np.arange(s)) + (scale - 1) / 2)
  rows = 2 * (scale * (y0 + np.arange(s)) + (scale - 1) / 2)
  for frame in video:
    np.testing.assert_allclose(frame[..., 1], np.tile(cols, (s, 1)), atol=4)
    np.testing.assert_allclose(frame[..., 2], np.tile(rows[:, None], (1, s)), atol=4)


@pytest.mark.parametrize("stored_short", [32, 64])
def test_samples_per_visit_gives_n_distinct_valid_examples(stored_short):
  # A short video (5 s, 50 frames) so that the examples' frames overlap: each example still
  # shows its own crop of a frame another example also shows.
  c = _config(image_size=24, resize_short=32, num_frames=4, clip_seconds=(0.5, 0.75),
              gap_seconds=0.25)
  record = _hand_record(0, duration=5.0, height=stored_short, width=stored_short * 3 // 2)
  overlap = 0
  for seed in range(3):
    out = _sample_n(record, c, seed, 3)
    assert out["video"].shape == (3, 4, 24, 24, 3)
    for j in range(3):
      _check_example(out, j, record, c, scale=stored_short // 32)
    # Independent draws: spans and crops differ.
    assert len({float(x) for x in out["span_start"]}) == 3
    overlap += len(out["frame_index"].ravel()) - len(set(out["frame_index"].ravel()))
    # Example 0 is the example one draw per visit gives (the same key).
    one = _sample(record, c, seed)
    for key in ("span_start", "frame_index", "crop", "order", "texts"):
      np.testing.assert_array_equal(out[key][0], one[key], err_msg=key)
    np.testing.assert_allclose(out["video"][0], one["video"], atol=2)
  assert overlap > 0  # the test exercised frames two examples show


@pytest.mark.parametrize("stored_short", [32, 64])
def test_samples_per_visit_invalid_examples_are_black(stored_short):
  c = _config(image_size=24, resize_short=32, num_frames=4)
  record = _hand_record(0, duration=12.0, words=False, height=stored_short,
                        width=stored_short * 3 // 2)
  out = _sample_n(record, c, 0, 2)
  assert not out["valid"].any() and out["video"].max() == 0
  # A record without frames: every example invalid and black, nothing out of range.
  empty = dataclasses.replace(record, frames=[], frame_times=[])
  out = _sample_n(empty, c, 0, 2)
  assert not out["valid"].any() and out["video"].max() == 0
  assert _sample(empty, c, 0)["video"].max() == 0


def test_samples_per_visit_whole_visit_batches_are_the_example_stream(data):
  # batch 8 holds 4 visits of 2 (batched as visits, then flattened); batch 5 does not (its
  # visits straddle batches): both give the same stream of examples, in the same order.
  whole = _take(input_pipeline.make_train_iterator(
      _config(samples_per_visit=2), data["hand"], data["tokenizer"], process_index=0,
      process_count=1), 5)
  c5 = _config(samples_per_visit=2)
  c5.batch_size = 5
  straddling = _take(input_pipeline.make_train_iterator(
      c5, data["hand"], data["tokenizer"], process_index=0, process_count=1), 8)
  for key in whole[0]:
    np.testing.assert_array_equal(np.concatenate([b[key] for b in whole]),
                                  np.concatenate([b[key] for b in straddling]), err_msg=key)
  labels = np.concatenate([b["label"] for b in whole])
  assert (labels[0::2] == labels[1::2]).all() and len(set(labels[:8])) == 4
  resumed = input_pipeline.make_train_iterator(_config(samples_per_visit=2), data["hand"],
                                               data["tokenizer"], start_step=3,
                                               process_index=0, process_count=1)
  _assert_batches_equal(next(resumed), whole[3])


def test_samples_per_visit_stream_deterministic_and_resume_exact(data):
  c = _config(samples_per_visit=3)  # batch 8: visits straddle batches (8 = 3 + 3 + 2)
  args = (c, data["hand"], data["tokenizer"])
  full = _take(input_pipeline.make_train_iterator(*args, process_index=0, process_count=1), 5)
  again = _take(input_pipeline.make_train_iterator(*args, process_index=0, process_count=1), 2)
  for a, b in zip(full, again):
    _assert_batches_equal(a, b)
  # The N examples of a visit are adjacent, of one record (the hand records' labels are
  # distinct), and different from each other.
  labels = np.concatenate([b["label"] for b in full])
  videos = np.concatenate([b["video"] for b in full])
  for v in range(len(labels) // 3):
    assert len(set(labels[3 * v:3 * v + 3])) == 1
    assert not np.array_equal(videos[3 * v], videos[3 * v + 1])
  assert len(set(labels[:12])) == 4  # and one visit per record, then the next record
  # 16 hand records = 48 examples an epoch: step 1 starts inside a visit (example 8 = visit 2,
  # example 2), step 4 (example 32 = visit 10, example 2) too.
  for step in (1, 4):
    resumed = input_pipeline.make_train_iterator(*args, start_step=step, process_index=0,
                                                 process_count=1)
    _assert_batches_equal(next(resumed), full[step])
  c1 = _config()
  one = next(input_pipeline.make_train_iterator(c1, data["hand"], data["tokenizer"],
                                                process_index=0, process_count=1))
  # Example 0 of each visit is the example one draw per visit would give there... for the
  # first visit, which both streams make of the same record at the same position.
  np.testing.assert_array_equal(full[0]["order"][0], one["order"][0])
  assert not np.array_equal(full[0]["video"][:3], one["video"][:3])  # 3 draws, not 3 visits


# --- DCT-domain downscaling of frames stored at >= 2x the needed size --------------------------


def test_scale_plan_picks_the_largest_dct_scale_that_fits():
  o = sampling.options(_config(image_size=24, resize_short=32))

  def plan(stored, size, **kw):
    branch, direct = sampling.scale_plan(tf.constant(stored, tf.int64),
                                         tf.constant(size, tf.int32), dict(o, **kw))
    return sampling.RATIOS[int(branch)], bool(direct)

  assert plan([32, 48], [32, 48]) == (1, True)  # stored at resize_short: crop while decoding
  assert plan([64, 96], [32, 48]) == (2, True)
  assert plan([128, 192], [32, 48]) == (4, True)
  assert plan([256, 384], [32, 48]) == (8, True)
  assert plan([1024, 1536], [32, 48]) == (8, False)  # 1/8 is the smallest scale: then resize
  assert plan([60, 90], [32, 48]) == (1, False)  # 1/2 would be too small: whole, resized
  assert plan([100, 150], [32, 48]) == (2, False)  # 50x75 at 1/2, resized to 32x48
  assert plan([536, 953], [268, 476]) == (2, True)  # 268x477: one pixel of rounding
  assert plan([64, 96], [32, 48], dct_downscale=False) == (1, False)
  assert plan([16, 24], [32, 48]) == (1, False)  # upscaled


@pytest.mark.parametrize("stored_short", [64, 128, 100])
def test_dct_downscaled_frames_match_the_resized_ones(stored_short):
  # The same examples with and without DCT scaling: the same crops, nearly the same pixels.
  c = _config(image_size=24, resize_short=32, num_frames=4)
  off = _config(image_size=24, resize_short=32, num_frames=4, dct_downscale=False)
  height, width = stored_short, stored_short * 3 // 2
  y, x = np.mgrid[0:height, 0:width]
  smooth = np.stack([np.full_like(x, 100), 255 * x // width, 255 * y // height], -1)
  buf = io.BytesIO()
  Image.fromarray(smooth.astype(np.uint8)).save(buf, format="JPEG", quality=95)
  record = _hand_record(0, height=height, width=width)
  record.frames[:] = [buf.getvalue()] * len(record.frames)  # ramps without wrap-around edges
  for seed in range(2):
    a, b = _sample(record, c, seed), _sample(record, off, seed)
    np.testing.assert_array_equal(a["crop"], b["crop"])
    diff = np.abs(a["video"].astype(np.float32) - b["video"].astype(np.float32))
    assert diff.mean() < 1.5 and diff.max() <= 8, (diff.mean(), diff.max())


def test_parallelism_keys_set_the_pipeline_not_the_stream(data):
  c = _config(threads=3, parallel_calls=2, prefetch_batches=1)
  ds, _ = input_pipeline.make_train_dataset(c, data["synthetic"], data["tokenizer"],
                                            process_index=0, process_count=1)
  assert ds.options().threading.private_threadpool_size == 3
  assert ds.options().threading.max_intra_op_parallelism == 1
  fixed = input_pipeline.make_train_iterator(c, data["synthetic"], data["tokenizer"],
                                             process_index=0, process_count=1)
  auto = input_pipeline.make_train_iterator(_config(), data["synthetic"], data["tokenizer"],
                                            process_index=0, process_count=1)
  for a, b in zip(_take(fixed, 2), _take(auto, 2)):
    _assert_batches_equal(a, b)


def test_host_memory_of_batches_in_flight():
  c = _config(prefetch_batches=3)  # 4 frames of 32², K 4 x text_len 8
  mem = input_pipeline.host_memory(c, 8)
  assert mem["batch_bytes"] == 8 * 4 * 32 * 32 * 3 + 8 * 4 * 8 * 5
  assert mem["in_flight_bytes"] == 5 * mem["batch_bytes"]
  auto = input_pipeline.host_memory(_config(), 8)
  assert auto["prefetch_batches"] == "autotune" and auto["in_flight_bytes"] is None
