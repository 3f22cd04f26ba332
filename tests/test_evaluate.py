"""Evaluation: the probes, retrieval metrics by hand, the TSN reader, eval mode end to end."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

import train_process
from configs import tiny
from data_pipelines import records, synthetic
from tvts_jax import config_schema, evaluate, evaluators, export, labelled
from tvts_jax import workdir as workdir_lib
from tvts_jax.evaluators import attentive_probe, probe, retrieval

# ---------------------------------------------------------------------------------------------
# Metrics against hand-computed rankings.


def test_video_retrieval_by_hand():
  # Unit vectors at angles 0, 10, 20, 100, 110 degrees: neighbours by cosine are obvious.
  angles = np.deg2rad([0.0, 10.0, 20.0, 100.0, 110.0])
  features = np.stack([np.cos(angles), np.sin(angles)], 1) * [[1], [2], [3], [4], [5]]
  labels = np.array([0, 1, 0, 1, 1])
  # Ranked neighbours (the query excluded): 0: 1,2,3,4 -> first hit (class 0) at 2.
  # 1: 0|2 tie (both 10 degrees; the lower index first), 3 -> class 1 first at rank 3.
  # 2: 1,0,3,4 -> hit at 2. 3: 4,2,1,0 -> hit at 1. 4: 3,2,1,0 -> hit at 1.
  m = retrieval.video_retrieval_metrics(features, labels, ks=(1, 2, 3))
  assert m["R@1"] == pytest.approx(2 / 5)
  assert m["R@2"] == pytest.approx(4 / 5)
  assert m["R@3"] == pytest.approx(5 / 5)
  assert m["num_queries"] == 5


def test_text_to_video_by_hand():
  # sim[i, j] = text_i . video_j: chosen so that the right video (the diagonal) ranks 1, 3, 2.
  video = np.eye(3)
  text = np.array([[0.9, 0.1, 0.0], [0.5, 0.2, 0.6], [0.1, 0.8, 0.3]])
  m = retrieval.text_to_video_metrics(text, video, ks=(1, 2))
  assert m["R@1"] == pytest.approx(1 / 3)
  assert m["R@2"] == pytest.approx(2 / 3)
  assert m["median_rank"] == 2 and m["mean_rank"] == pytest.approx(2.0)


def test_topk_accuracy():
  logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
  labels = np.array([2, 0, 0])
  assert probe.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert probe.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
  assert probe.topk_accuracy(logits, labels, 5) == 1.0  # capped at the 3 classes


# ---------------------------------------------------------------------------------------------
# The linear probe.


def _planted(n, seed, num_classes=6, dim=24, separation=2.0):
  """Gaussian classes around fixed means (the same for every seed): linearly separable."""
  means = np.random.default_rng(1234).normal(size=(num_classes, dim)) * separation
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, n)
  return (means[y] + rng.normal(size=(n, dim))).astype(np.float32), y


_PROBE = dict(weight_decays=(0.0, 1e-2), max_steps=200, holdout_fraction=0.25)


def test_probe_recovers_a_planted_signal_and_is_at_chance_without_one():
  train_x, train_y = _planted(600, seed=0)
  test_x, test_y = _planted(600, seed=1)
  out = probe.linear_probe(train_x, train_y, test_x, test_y, **_PROBE)
  assert out["top1"] > 0.95 and out["top5"] == 1.0
  assert out["num_classes"] == 6 and out["num_train"] == 600
  assert out["weight_decay"] in (0.0, 1e-2) and "holdout_top1@0.01" in out

  shuffled = np.random.default_rng(2).permutation(train_y)
  out = probe.linear_probe(train_x, shuffled, test_x, test_y, **_PROBE)
  assert abs(out["top1"] - 1 / 6) < 0.07, out["top1"]


def test_classifier_converges_and_the_penalty_shrinks_it():
  x, y = _planted(400, seed=0, num_classes=3, separation=1.0)
  fit = lambda wd: probe.train_linear_classifier(x, y, 3, weight_decay=wd, max_steps=300)
  w, b = fit(1e-3)
  # At the optimum of CE + wd/2 |w|^2 the gradient vanishes: dCE/dw = -wd * w.
  p = np.array(jax.nn.softmax(x @ w + b))
  p[np.arange(len(y)), y] -= 1
  np.testing.assert_allclose(x.T @ p / len(y), -1e-3 * w, atol=2e-4)
  assert probe.topk_accuracy(x @ w + b, y, 1) > 0.9
  strong, _ = fit(10.0)
  assert np.linalg.norm(strong) < 0.1 * np.linalg.norm(w)


# ---------------------------------------------------------------------------------------------
# The TSN-style labelled reader.


def _frame(index, height=32, width=48):
  """Red encodes the frame index, green the column (to check the crop)."""
  image = np.zeros((height, width, 3), np.uint8)
  image[..., 0] = 10 * index
  image[..., 1] = (4 * np.arange(width))[None, :]
  return tf.io.encode_jpeg(image, quality=100).numpy()


def _record(video_id, label, segments=()):
  times = np.arange(16) / 2.0  # 8 s at 2 fps
  return records.VideoRecord(
      video_id=video_id, source="hand", duration=8.0, fps=2.0, height=32, width=48,
      frames=[_frame(i) for i in range(16)], frame_times=times.tolist(), words=[],
      word_starts=[], word_ends=[], label=label,
      segment_labels=[s[0] for s in segments], segment_starts=[s[1] for s in segments],
      segment_ends=[s[2] for s in segments])


@pytest.fixture(scope="module")
def labelled_records(tmp_path_factory):
  directory = tmp_path_factory.mktemp("labelled")
  path = str(directory / "hand-test.tfrecord-00000-of-00001")
  with tf.io.TFRecordWriter(path) as w:
    w.write(records.serialize(_record("whole", 3)))  # one example over 0-8 s
    w.write(records.serialize(_record("segments", -1, [(5, 0.0, 4.0), (-1, 2.0, 3.0),
                                                      (1, 4.0, 8.0)])))  # two examples
    w.write(records.serialize(_record("nothing", -1)))  # none
  return path


def _reader_config():
  config = tiny.get_config()  # 4 frames, image_size = resize_short = 32
  config.data.eval_batch_size = 4
  return config


def _frame_indices(video):
  return np.round(video[:, :, 0, 0, 0].astype(np.float32) / 10).astype(int)


def test_labelled_reader_tsn_frames_labels_and_centre_crop(labelled_records):
  batches = labelled.make_labelled_iterator(_reader_config(), labelled_records,
                                            process_index=0, process_count=1)
  assert len(batches) == 1 and batches.num_examples == 3
  (batch,) = list(batches)
  assert batch["video"].dtype == np.uint8 and batch["video"].shape == (4, 4, 32, 32, 3)
  np.testing.assert_array_equal(batch["valid"], [True, True, True, False])
  np.testing.assert_array_equal(batch["label"], [3, 5, 1, -1])
  # Middles of 4 equal parts: 0-8 s -> 1,3,5,7 s -> frames 2,6,10,14; 0-4 s -> 1,3,5,7;
  # 4-8 s -> 9,11,13,15.
  np.testing.assert_array_equal(_frame_indices(batch["video"][:3]),
                                [[2, 6, 10, 14], [1, 3, 5, 7], [9, 11, 13, 15]])
  # Centre crop of the 48-wide frame: columns 8..39 (green = 4 * column).
  green = batch["video"][0, 0, 16, :, 1].astype(int)
  assert abs(green[0] - 32) <= 4 and abs(green[-1] - 156) <= 4
  assert not batch["video"][3].any()  # padding is black


def test_labelled_reader_hosts_split_the_examples(labelled_records):
  config = _reader_config()
  seen = []
  for host in range(2):
    batches = labelled.make_labelled_iterator(config, labelled_records, process_index=host,
                                              process_count=2)
    assert len(batches) == 1  # every host runs the same number of batches
    (batch,) = list(batches)
    assert batch["video"].shape[0] == 2
    seen += list(batch["label"][batch["valid"]])
  assert sorted(seen) == [1, 3, 5]
  capped = labelled.make_labelled_iterator(config, labelled_records, max_examples=2,
                                           process_index=0, process_count=1)
  (batch,) = list(capped)
  np.testing.assert_array_equal(batch["label"][batch["valid"]], [3, 5])


def test_attentive_probe_finds_a_signal_the_cls_token_lacks():
  """The class sits in one random non-CLS token: the pooler finds it, a CLS probe cannot."""
  rng = np.random.default_rng(0)
  n, s, d, c = 640, 9, 16, 4
  means = rng.normal(size=(c, d)) * 3.0
  y = rng.integers(c, size=n)
  x = rng.normal(size=(n, s, d)).astype(np.float32)
  x[np.arange(n), rng.integers(1, s, size=n)] += means[y]
  x_train, y_train, x_test, y_test = x[:480], y[:480], x[480:], y[480:]

  def batches():
    while True:
      index = rng.choice(len(x_train), 64, replace=False)
      yield x_train[index], y_train[index]

  predict, loss = attentive_probe.fit_attentive_probe(
      batches(), width=d, num_heads=2, num_classes=c, steps=300, lr=3e-3, weight_decay=0.0)
  assert probe.topk_accuracy(predict(x_test), y_test, 1) > 0.9, loss
  cls_only = probe.linear_probe(x_train[:, 0], y_train, x_test[:, 0], y_test, **_PROBE)
  assert cls_only["top1"] < 0.45


# ---------------------------------------------------------------------------------------------
# Eval mode end to end on the tiny demo data.


def _eval_config():
  config = tiny.get_config()
  config.evals.probe.steps = 50
  config.evals.probe.weight_decays = (0.0, 1e-3)
  config.evals.attentive_probe.steps = 20
  return config


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A workdir holding a checkpoint of the untrained model (its init = the random baseline)."""
  config = _eval_config()
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, train_process.checkpoint_workdir(config, workdir, 7)


def test_eval_mode_checkpoint_random_init_and_export(trained_workdir, capsys):
  workdir, trainer = trained_workdir
  config = _eval_config()
  results = evaluate.evaluate(config, workdir, random_init=True)
  assert set(results) == {"checkpoint", "random_init"}
  ckpt, rand = results["checkpoint"]["metrics"], results["random_init"]["metrics"]
  assert results["checkpoint"]["step"] == 7
  # The demo probe: 9 action classes, one example per annotated event.
  assert ckpt["probe/num_classes"] == len(synthetic.action_names()) and ckpt["probe/num_train"] > 100
  for key in ("probe/top1", "probe/top5", "v2v_retrieval/R@1", "v2v_retrieval/R@10",
              "sort/sort_acc", "sort/position_acc", "t2v_retrieval/R@1"):
    assert 0.0 <= ckpt[key] <= 1.0, key
  assert ckpt["probe/top1"] <= ckpt["probe/top5"]
  # Zero-shot classification names the demo's 9 actions through the prompt; the demo has no
  # captions, so caption retrieval says so.
  assert ckpt["zero_shot_classification/num_classes"] == len(synthetic.action_names())
  assert 0.0 <= ckpt["zero_shot_classification/top1"] <= ckpt["zero_shot_classification/top5"]
  assert "carry a caption" in results["checkpoint"]["skipped"]["caption_retrieval"]
  assert ckpt["v2v_retrieval/R@1"] <= ckpt["v2v_retrieval/R@5"] <= ckpt["v2v_retrieval/R@10"]
  assert -1.0 <= ckpt["sort/kendall_tau"] <= 1.0
  assert 1 <= ckpt["t2v_retrieval/median_rank"] <= ckpt["t2v_retrieval/num_queries"]
  # The checkpoint holds the untrained init, which is what random_init builds: the same
  # numbers, so restore + evaluation are deterministic and the baseline is the right one.
  for key, value in ckpt.items():
    assert rand[key] == pytest.approx(value, abs=1e-6), key

  saved = json.load(open(os.path.join(workdir, evaluate.RESULTS_FILE)))
  assert saved["results"]["checkpoint"]["metrics"] == pytest.approx(ckpt)
  assert tf.io.gfile.glob(os.path.join(workdir, "eval", "checkpoint", "events.out.*"))
  table = capsys.readouterr().out
  assert "probe/top1" in table and "checkpoint step 7" in table and "random init" in table

  # The same encoder from an export file: the same retrieval; the sorter is not in it.
  path = export.export_params(config, trainer.state["params"],
                              os.path.join(workdir, "enc.safetensors"), step=7)
  results = evaluate.evaluate(config, workdir, source=path, names=("v2v_retrieval", "sort"))
  exp = results["export"]
  assert exp["metrics"]["v2v_retrieval/R@1"] == pytest.approx(ckpt["v2v_retrieval/R@1"])
  assert "--export_full" in exp["skipped"]["sort"] and "sort/sort_acc" not in exp["metrics"]


def test_caption_retrieval_over_records_with_captions(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  path = str(tmp_path / "cap-test.tfrecord-00000-of-00001")
  captions = ["a red circle", "a blue square", "", "the cross grows", "it moves left",
              "two shapes"]
  with tf.io.TFRecordWriter(path) as w:
    for i, caption in enumerate(captions):
      r = _record(f"v{i}", i)
      r.frames = [_frame(i + j) for j in range(16)]
      r.caption = caption
      w.write(records.serialize(r))
  config = _eval_config()
  config.evals.caption_retrieval.records = path
  config.evals.zero_shot_classification.update(records=path,
                                               class_names=tuple(f"c{i}" for i in range(6)))
  results = evaluate.evaluate(config, workdir, names=("caption_retrieval",
                                                      "zero_shot_classification"))
  m = results["checkpoint"]["metrics"]
  for direction in ("t2v", "v2t"):  # the five captioned videos, not the one without
    assert m[f"caption_retrieval/{direction}/num_queries"] == 5
    assert m[f"caption_retrieval/{direction}/R@10"] == 1.0  # every rank is <= 5
    assert 1 <= m[f"caption_retrieval/{direction}/median_rank"] <= 5
  assert m["zero_shot_classification/num_examples"] == 6
  assert m["zero_shot_classification/top5"] >= m["zero_shot_classification/top1"]


def test_eval_refuses_a_workdir_trained_with_another_model(trained_workdir):
  workdir, _ = trained_workdir
  config = _eval_config()
  config.model.video.depth = 3
  with pytest.raises(config_schema.ConfigError, match=r"model\.video\.depth: 2 there, 3 here"):
    workdir_lib.check_workdir_config(config, workdir)
  config = _eval_config()
  config.model.remat = "full"  # changes no parameter: accepted
  workdir_lib.check_workdir_config(config, workdir)
  # Nor does the attention kernel: trained with 'cudnn' on a GPU (or with 'xla', the default
  # before 'auto'), evaluated with 'auto' here.
  for trained_with in ("cudnn", "xla"):
    saved = json.loads(_eval_config().to_json_best_effort())
    saved["model"]["attention"] = trained_with
    workdir_lib.check_same_model(_eval_config(), saved, "GPU run")
  # A config.json written before a key existed: the key counts as its default.
  saved = json.loads(_eval_config().to_json_best_effort())
  del saved["model"]["video"]["ln_eps"]
  workdir_lib.check_same_model(_eval_config(), saved, "old run")
  config.model.video.ln_eps = 1e-5
  with pytest.raises(config_schema.ConfigError, match=r"ln_eps: 1e-06 there, 1e-05 here"):
    workdir_lib.check_same_model(config, saved, "old run")


def test_eval_config_keys_are_validated():
  config = _eval_config()
  config.evals.probe.type = "linear"
  with pytest.raises(config_schema.ConfigError, match="evals.probe.type='linear'"):
    evaluators.check_config(config)
  config = _eval_config()
  config.evals.probe.holdout_fraction = 1.0
  with pytest.raises(config_schema.ConfigError, match="holdout"):
    evaluators.check_config(config)
  config = _eval_config()
  config.evals.probe.weight_decay = 0.1  # the option is weight_decays
  with pytest.raises(config_schema.ConfigError,
                     match=r"'evals.probe.weight_decay' \(did you mean 'weight_decays'\?\)"):
    evaluators.check_config(config)
  config = _eval_config()
  config.evals.sort.every_steps = -1
  with pytest.raises(config_schema.ConfigError, match="every_steps=-1"):
    evaluators.check_config(config)
  # A config of another name and type is one more evaluation; a bare dict is not one.
  config = _eval_config()
  config.evals.sort_again = evaluators.config("sort", every_steps=3, shuffled_control=False)
  evaluators.check_config(config)
  with pytest.raises(config_schema.ConfigError, match="no option 'shuffle'"):
    evaluators.config("sort", shuffle=True)
  config.evals.bare = ml_collections.ConfigDict(dict(records="x"))
  with pytest.raises(config_schema.ConfigError, match="evals.bare must be an evaluation"):
    evaluators.check_config(config)


@pytest.mark.parametrize("old", ["eval_every_steps", "eval"])
def test_replaced_eval_keys_say_what_replaced_them(old):
  config = _eval_config()
  config[old] = 100 if old == "eval_every_steps" else ml_collections.ConfigDict(
      dict(protocols="probe"))
  with pytest.raises(config_schema.ConfigError, match=f"{old!r} was replaced by evals"):
    config_schema.validate(config)
