"""The trainer: sharded state, the step on 1 vs 8 devices, non-finite skips, resume, learning."""

import time

import jax
import ml_collections
import numpy as np
from flax import nnx
import pytest

from configs import tiny
from tvts_jax import config_schema, input_pipeline, optim, sharding, train


def _random_batch(config, seed=0, batch_size=None):
  rng = np.random.default_rng(seed)
  d = config.data
  b = batch_size or config.batch_size
  order = np.stack([rng.permutation(d.num_clips) for _ in range(b)]).astype(np.int32)
  mask = np.zeros((b, d.num_clips, d.text_len), bool)
  mask[..., :5] = True
  return {
      "video": rng.integers(0, 256, (b, d.num_frames, d.image_size, d.image_size, 3),
                            dtype=np.uint8),
      "text_ids": np.where(mask, rng.integers(4, config.model.text.vocab_size, mask.shape),
                           0).astype(np.int32),
      "text_mask": mask,
      "order": order,
      "valid": np.ones((b,), bool),
  }


def _mesh(data, fsdp, n):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)),
                            devices=jax.devices()[:n])


def test_state_is_created_sharded_over_fsdp():
  config = tiny.get_config()
  config.model.video.width = 64  # a 64x256 MLP kernel: large enough for the fsdp rule
  config.model.video.mlp_dim = 256
  trainer = train.Trainer(config, _mesh(4, 2, 8))
  specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in
           jax.tree_util.tree_flatten_with_path(trainer.state["params"])[0]}
  sharded = [k for k, s in specs.items() if "fsdp" in tuple(s)]
  assert sharded, specs
  # Adam's moments follow their parameters.
  mu_specs = [x.sharding.spec for x in jax.tree.leaves(trainer.state["opt_state"])
              if x.ndim >= 2]
  assert any("fsdp" in tuple(s) for s in mu_specs)


@pytest.mark.parametrize("text_arch", ["tvts", "distilbert"])
def test_step_on_1_and_8_devices_agree(text_arch):
  config = tiny.get_config()
  config.model.text.update(arch=text_arch, max_positions=16 if text_arch == "distilbert" else 0)
  # Some directions have a true gradient of exactly zero (the attention key bias: softmax is
  # shift invariant), so their computed gradient is rounding noise, which Adam with a tiny eps
  # scales up to +-lr differently on every mesh. A larger eps keeps those updates negligible
  # while every real gradient still moves its parameter.
  config.optim.eps = 1e-4
  batch = _random_batch(config)
  results = []
  for data, fsdp, n in ((1, 1, 1), (4, 2, 8)):
    trainer = train.Trainer(config, _mesh(data, fsdp, n))
    losses = [float(trainer.step(batch)["loss"]) for _ in range(3)]
    results.append((losses, jax.device_get(trainer.state["params"])))
  (l1, p1), (l8, p8) = results
  np.testing.assert_allclose(l1, l8, rtol=2e-5)
  assert l1[2] != l1[0]  # the steps changed the parameters
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    # 5% of one update (~lr = 1e-3): with the post-LN tower, the reductions 8 devices reorder
    # moved one weight of 12288 by 1.7e-5 in a run.
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=5e-5)


def test_nonfinite_step_is_skipped_and_counted():
  config = tiny.get_config()
  config.temperature = 0.0  # cosine / 0 -> inf logits -> a NaN loss
  trainer = train.Trainer(config, _mesh(8, 1, 8))
  before = jax.device_get(trainer.state["params"])
  metrics = trainer.step(_random_batch(config))
  assert not np.isfinite(float(metrics["loss"]))
  assert int(trainer.state["nonfinite"]) == 1 and int(trainer.state["step"]) == 1
  after = jax.device_get(trainer.state["params"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_step_schedule_decays_at_the_reference_epochs():
  config = tiny.get_config()
  config.total_steps = 100
  sched = optim.make_schedule(config)
  lr = config.optim.lr
  np.testing.assert_allclose([sched(0), sched(59), sched(60), sched(79), sched(80)],
                             [lr, lr, lr * 0.1, lr * 0.1, lr * 0.01], rtol=1e-6)


def test_weight_decay_mask_spares_norms_biases_embeddings():
  trainer = train.Trainer(tiny.get_config(), _mesh(8, 1, 8))
  # The state crosses the jit boundary every step as plain dicts of arrays (no nnx Variables,
  # whose Python flattening costs milliseconds a step); the model is rebuilt inside the step.
  nodes = jax.tree.leaves(trainer.state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert all(isinstance(x, jax.Array) for x in nodes)
  assert type(trainer.state["params"]) is dict  # pylint: disable=unidiomatic-typecheck
  mask = {jax.tree_util.keystr(p): m for p, m in
          jax.tree_util.tree_flatten_with_path(optim.decay_mask(trainer.state["params"]))[0]}
  decayed = [k for k, m in mask.items() if m]
  assert decayed and all("kernel" in k for k in decayed), decayed
  assert not any(("bias" in k or "norm" in k or "embed" in k) for k in decayed)


def test_resume_matches_uninterrupted_run(tmp_path):
  demo_workdirs = tmp_path
  config = tiny.get_config()
  config.total_steps = 6
  config.checkpoint_every_steps = 3
  config.evals = ml_collections.ConfigDict()  # what is compared is training: no eval compiles
  # The interrupted run is a 3-step run; a constant rate makes its first 3 steps those of the
  # 6-step run (a decay schedule depends on total_steps).
  config.optim.schedule = "constant"
  full = str(demo_workdirs / "full")
  out_full = train.train_and_evaluate(config, full)
  part = str(demo_workdirs / "part")
  # Each workdir gets its own demo data, generated deterministically from the same seed.
  short = config.copy_and_resolve_references()
  short.total_steps = 3
  train.train_and_evaluate(short, part)
  out_resumed = train.train_and_evaluate(config, part)
  assert out_resumed["step"] == out_full["step"] == 6
  # Logged every 2 steps as the mean since the last log: the log at step 6 covers steps 5-6 in
  # both runs (the resumed run's log at 4 covers step 4 alone).
  np.testing.assert_allclose(dict(out_resumed["history"])[6], dict(out_full["history"])[6],
                             rtol=1e-5)
  from tvts_jax import checkpoint as ckpt_lib
  restored = []
  for wd in (full, part):
    c = ckpt_lib.Checkpointer(wd, 3)
    trainer = train.Trainer(config, _mesh(8, 1, 8))
    restored.append(jax.device_get(c.restore(6, trainer.abstract_state())))
    c.close()
  for a, b in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_checkpoint_from_another_config_is_a_clear_error(tmp_path):
  from tvts_jax import checkpoint as ckpt_lib
  saver = ckpt_lib.Checkpointer(str(tmp_path), 3)
  saver.save(1, train.Trainer(tiny.get_config(), _mesh(8, 1, 8)).state)
  saver.close()
  config = tiny.get_config()
  config.model.video.mlp_dim = 48
  c = ckpt_lib.Checkpointer(str(tmp_path), 3)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="video/blocks/layers/0/mlp/fc1"):
    c.restore(1, train.Trainer(config, _mesh(8, 1, 8)).abstract_state())
  c.close()


def test_tiny_model_fits_a_batch_below_chance():
  """The whole gradient path learns: 40 steps on one batch take the loss far below chance."""
  config = tiny.get_config()
  config.optim.update(schedule="constant", lr=3e-3)
  trainer = train.Trainer(config, _mesh(8, 1, 8))
  batch = _random_batch(config)
  losses = [float(trainer.step(batch)["loss"]) for _ in range(40)]
  # Chance: log(B) per contrastive direction, log(K) per transcript for the sort loss.
  chance = 2 * np.log(config.batch_size) + config.sort_weight * np.log(config.data.num_clips)
  assert np.mean(losses[-5:]) < 0.6 * chance, losses


def test_tiny_config_trains_end_to_end(tmp_path, monkeypatch):
  """train_and_evaluate on the demo data: the loss goes down, eval and the control are logged;
  a pipeline slowed by a known sleep a batch shows in the wait accounting."""
  sleep_s = 0.03
  make = input_pipeline.make_train_iterator

  def slow_iterator(*args, **kwargs):
    inner = make(*args, **kwargs)
    for batch in inner:
      time.sleep(sleep_s)
      yield batch

  monkeypatch.setattr(input_pipeline, "make_train_iterator", slow_iterator)
  config = tiny.get_config()
  config.total_steps = 40
  config.log_every_steps = 5
  config.checkpoint_every_steps = 40
  config.evals.sort.every_steps = 40
  config.optim.update(schedule="constant", lr=2e-3)
  out = train.train_and_evaluate(config, str(tmp_path))
  m = out["train"]  # the last interval: 5 batches, each after a sleep (bounds that always hold)
  assert m["data_wait_s"] >= 5 * sleep_s
  assert 0.0 < m["data_wait_fraction"] <= 1.0
  assert m["data_wait_fraction"] == pytest.approx(m["data_wait_s"] * m["steps_per_s"] / 5)
  assert m["input_clips_per_s"] == pytest.approx(m["clips_per_s"])  # one host
  assert m["step_clips_per_s"] >= m["clips_per_s"]
  losses = [loss for _, loss in out["history"]]
  assert [s for s, _ in out["history"]] == list(range(5, 41, 5))
  assert np.mean(losses[-2:]) < 0.9 * losses[0], losses
  for name in ("sort", "sort/shuffled_frames"):
    assert 0.0 <= out["eval"][f"{name}/sort_acc"] <= 1.0
    assert out["eval"][f"{name}/num_examples"] > 0
  assert (tmp_path / "config.json").exists()
  assert (tmp_path / "checkpoints" / "40").exists()


def _groups_trainer(rules, steps, **overrides):
  config = tiny.get_config()
  config.optim.update(schedule="constant", lr=1e-4, param_groups=rules, **overrides)
  trainer = train.Trainer(config, _mesh(1, 1, 1))  # the groups do not depend on the mesh
  init = jax.device_get(trainer.state["params"])
  batch = _random_batch(config)
  for _ in range(steps):
    trainer.step(batch)
  return trainer, init, jax.device_get(trainer.state["params"])


def test_param_groups_freeze_and_scale_the_learning_rate():
  frozen = ("^text/blocks/", 0.0, 0.0)
  trainer, init, after = _groups_trainer((frozen, ("", 1.0, 0.0)), steps=5)
  # Frozen: bit-identical after 5 steps, and no optimizer state for them.
  for a, b in zip(jax.tree.leaves(init["text"]["blocks"]), jax.tree.leaves(after["text"]["blocks"])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(init["video"]["norm"]["scale"], after["video"]["norm"]["scale"])
  trainable = sum(x.size for k, v in init.items() for x in jax.tree.leaves(v)) - sum(
      x.size for x in jax.tree.leaves(init["text"]["blocks"]))
  moments = sum(x.size for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim)
  assert moments == 2 * trainable  # AdamW's mu and nu of the trainable parameters only
  assert trainer.param_groups[0].startswith("'^text/blocks/': ") and "frozen" in \
      trainer.param_groups[0]

  # The same gradient, the video tower at 1e-3 x the rate: AdamW's first update is
  # lr * g / (|g| + eps), so it moves exactly 1000x less.
  config = tiny.get_config()
  graphdef = trainer.graphdef
  params = trainer.state["params"]
  grads = jax.jit(jax.grad(lambda p: train.model_outputs_and_loss(
      graphdef, p, _random_batch(config), jax.random.key(0), config)[0]))(params)
  moves = []
  for rules in ((frozen, ("", 1.0, 0.0)), (frozen, ("^video/", 1e-3, 0.0), ("", 1.0, 0.0))):
    config.optim.update(schedule="constant", lr=1e-4, eps=1e-12, param_groups=rules)
    tx = optim.make_optimizer(config)
    moves.append(jax.device_get(jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0])(
        grads, params)))
  for a, b in zip(jax.tree.leaves(moves[0]["video"]), jax.tree.leaves(moves[1]["video"])):
    np.testing.assert_allclose(b, 1e-3 * a, rtol=1e-4, atol=1e-14)
  assert np.abs(moves[0]["video"]["norm"]["scale"]).max() > 5e-5  # ~lr
  np.testing.assert_array_equal(moves[0]["sorter"]["head"]["kernel"],
                                moves[1]["sorter"]["head"]["kernel"])
  assert not np.any(moves[1]["text"]["blocks"]["layers"][0]["mlp"]["fc1"]["kernel"])


def test_param_group_errors_are_named():
  config = tiny.get_config()
  config.optim.param_groups = (("^nothing/", 1.0, 0.0), ("", 1.0, 0.0))
  with pytest.raises(config_schema.ConfigError, match="'\\^nothing/' of optim.param_groups "
                                                      "matches no parameter"):
    train.Trainer(config, _mesh(8, 1, 8))
  config.optim.param_groups = (("^video/", 1.0, 0.0),)
  with pytest.raises(config_schema.ConfigError, match="the parameter (sorter|text)/.* matches no rule"):
    train.Trainer(config, _mesh(8, 1, 8))
  config.optim.param_groups = (("^video/blocks/layers/0/", 0.0, 0.0), ("", 1.0, 0.0))
  config.model.scan_layers = True
  with pytest.raises(config_schema.ConfigError, match="set model.scan_layers=False"):
    train.Trainer(config, _mesh(8, 1, 8))
  config.optim.param_groups = (("(", 1.0, 0.0),)
  with pytest.raises(config_schema.ConfigError, match="is not a regex"):
    config_schema.validate(config)
