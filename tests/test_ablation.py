"""The ablation command end to end on the tiny config, its resume, and the sort figure."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from tvts_jax import ablation, config_schema
from tvts_jax.evaluators import sort


def _config():
  """The tiny config, cut to a few steps and to the evaluations the table reads."""
  config = tiny.get_config()
  config.total_steps = 2
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  for name in ("attentive_probe", "zero_shot_classification", "caption_retrieval"):
    del config.evals[name]
  config.evals.sort.every_steps = 0  # evaluated once, at the end, by the ablation
  config.evals.sort.images = 2
  config.evals.probe.update(steps=10, weight_decays=(0.0,))
  config.data.eval_batches = 1
  return config


def test_ablation_end_to_end_and_resume(tmp_path, capsys):
  workdir = str(tmp_path)
  out = ablation.run_ablation(_config(), workdir)
  printed = capsys.readouterr().out
  assert list(out["rows"]) == ["random", "tvts", "contrastive", "sort"]
  for row in ("random", "tvts", "contrastive", "sort"):
    assert row in printed
  with open(os.path.join(workdir, "ablation.json")) as f:
    saved = json.load(f)
  assert list(saved["rows"]) == ["random", "tvts", "contrastive", "sort"]
  for name, row in saved["rows"].items():
    assert set(row["metrics"]) == {label for label, _, _ in ablation.COLUMNS}, name
    assert all(0.0 <= v <= 1.0 for v in row["metrics"].values()), row["metrics"]
    assert row["steps"] == (0 if name == "random" else 2)
  assert saved["rows"]["sort"]["overrides"] == {"contrastive_weight": 0.0}
  assert saved["rows"]["contrastive"]["overrides"] == {"sort_weight": 0.0}
  assert saved["rows"]["random"]["metrics"]["chance sort acc"] == pytest.approx(1 / 24)
  # Each arm is an ordinary run with its override, on the one copy of the demo data.
  with open(os.path.join(workdir, "sort", "config.json")) as f:
    arm = json.load(f)
  assert arm["contrastive_weight"] == 0.0 and arm["sort_weight"] == 2.0
  assert os.path.realpath(os.path.join(workdir, "tvts", "demo_data")) == os.path.realpath(
      os.path.join(workdir, "data"))
  assert [d for d in os.listdir(os.path.join(workdir, "data")) if d.startswith("demo-")]
  for png in ("ablation.png", "sort_examples.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png

  # Again: nothing is trained or evaluated again, the same numbers come back.
  mtimes = {a: os.path.getmtime(os.path.join(workdir, a, "checkpoints", "2"))
            for a in ablation.ARMS}
  again = ablation.run_ablation(_config(), workdir)
  printed = capsys.readouterr().out
  assert printed.count("not trained again") == 3 and "found in" in printed
  assert {a: os.path.getmtime(os.path.join(workdir, a, "checkpoints", "2"))
          for a in ablation.ARMS} == mtimes
  assert {a: ablation.latest_step(os.path.join(workdir, a)) for a in ablation.ARMS} == {
      a: 2 for a in ablation.ARMS}
  assert {n: r["metrics"] for n, r in again["rows"].items()} == {
      n: r["metrics"] for n, r in out["rows"].items()}


def test_bad_arms_are_named():
  assert ablation.parse_arms("sort,tvts") == ["sort", "tvts"]
  with pytest.raises(ValueError, match=r"unknown arm\(s\) \['mae'\]; choose from"):
    ablation.parse_arms("tvts,mae")
  with pytest.raises(ValueError, match="twice"):
    ablation.parse_arms(["sort", "sort"])
  with pytest.raises(ValueError, match="empty"):
    ablation.parse_arms("")
  config = tiny.get_config()
  config.sort_weight = 0.0  # the sort arm would then train nothing
  with pytest.raises(config_schema.ConfigError, match="arm 'sort'.*both 0"):
    ablation.arm_config(config, "sort")


def test_sort_figure_shape_and_content():
  rng = np.random.RandomState(0)
  n, t, size, k, length = 4, 4, 32, 4, 8
  examples = dict(
      video=rng.randint(0, 256, (n, t, size, size, 3)).astype(np.uint8),
      text_ids=rng.randint(3, 60, (n, k, length)).astype(np.int32),
      text_mask=np.arange(length)[None, None] < rng.randint(2, length, (n, k, 1)),
      order=np.stack([rng.permutation(k) for _ in range(n)]).astype(np.int32),
      sort_logits=rng.randn(n, k, k).astype(np.float32))
  image = sort.render_examples(examples, 3, decode=lambda ids: "w" * len(ids))
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[0] > 100 and image.shape[1] > 100
  assert image.std() > 10  # frames and text, not a blank canvas
  # Fewer rows: a shorter figure.
  assert sort.render_examples(examples, 1).shape[0] < image.shape[0]
