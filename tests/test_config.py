"""The config schema: every shipped config is valid; a typo or an impossible shape is a
`ConfigError` naming the key, raised before the trainer touches the workdir or the devices."""

import importlib
import os
import subprocess
import sys

import pytest

from configs import tiny
from tvts_jax import config_schema, train
from tvts_jax.config_schema import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")
    and f != "__init__.py"))
def test_shipped_configs_are_valid(name):
  from tvts_jax import evaluators  # pylint: disable=g-import-not-at-top
  config = config_schema.validate(importlib.import_module(f"configs.{name}").get_config())
  evaluators.check_config(config)


@pytest.mark.parametrize("key,value,message", [
    ("totl_steps", 5, r"unknown config key 'totl_steps' \(did you mean 'total_steps'\?\)"),
    ("model.video.widht", 64, r"unknown config key 'model\.video\.widht'"),
    ("data.skip_corrupt", True, r"unknown config key 'data\.skip_corrupt'"),
])
def test_unknown_key_is_named(key, value, message):
  config = tiny.get_config()
  parent, _, leaf = key.rpartition(".")
  group = config
  for part in filter(None, parent.split(".")):
    group = group[part]
  group[leaf] = value  # a ConfigDict accepts new keys unless locked: validate must catch them
  with pytest.raises(ConfigError, match=message):
    config_schema.validate(config)


@pytest.mark.parametrize("overrides,message", [
    ({"model.video.patch_size": 7}, "patch_size=7 does not divide data.image_size=32"),
    ({"data.num_frames": 5}, "tubelet=2 does not divide data.num_frames=5"),
    ({"data.resize_short": 16}, "resize_short=16 is smaller than the crop"),
    ({"model.video.num_heads": 3}, "model.video.width=32 is not divisible by num_heads=3"),
    ({"model.text.num_heads": 5}, "model.text.width=32 is not divisible by num_heads=5"),
    ({"model.sorter.num_heads": 3}, "model.sorter.num_heads=3 does not divide"),
    ({"model.video.keep_ratio": 0.0}, r"keep_ratio=0.0 must be in \(0, 1\]"),
    ({"data.num_clips": 1}, "sorting needs at least 2 clips"),
    ({"sort_loss": "sinkhorn", "data.num_clips": 9}, "num_clips must be <= 8"),
    ({"data.text_len": 1}, "text_len=1 must be at least 2"),
    ({"data.clip_seconds": (0,)}, "clip_seconds=.* must be positive"),
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"checkpoint_every_steps": -1}, "checkpoint_every_steps must be positive"),
    ({"mesh.fsdp": 0}, "fsdp >= 1"),
    ({"nonfinite": "ignore"}, "nonfinite='ignore'; must be one of"),
    ({"optim.schedule": "linear"}, "optim.schedule='linear'"),
    ({"init_from": "bert:/x"},
     r"'bert:/x' is not one of \['mae:PATH', 'distilbert:PATH', 'clip:PATH', 'tvts_torch:PATH', "
     r"'tvts_v2_torch:PATH'\]"),
    ({"model.video.temporal_init_std": 0.0}, "temporal_init_std must be > 0"),
    ({"data.samples_per_visit": 0}, "samples_per_visit=0 must be >= 1"),
    ({"demo.generator_version": 1}, r"demo.generator_version=1; must be one of \(2, 3\)"),
    ({"contrastive_weight": -1.0}, "contrastive_weight=-1.0 must be >= 0"),
    ({"sort_weight": -0.5}, "sort_weight=-0.5 must be >= 0"),
    ({"contrastive_weight": 0.0, "sort_weight": 0.0},
     "contrastive_weight and sort_weight are both 0: nothing would be trained"),
    ({"data.parallel_calls": -1}, r"data.parallel_calls=-1 must be >= 0 \(0: automatic\)"),
    ({"model.attention": "flash"}, "model.attention='flash'; must be one of"),
    ({"model.attention": "cudnn"}, "'cudnn': cuDNN attention runs in bfloat16 only"),
    ({"model.attention": "cudnn", "compute_dtype": "bfloat16", "model.text.num_heads": 8},
     "model.text has head dimension 4; cuDNN needs a multiple of 8"),
    ({"model.attention": "cudnn", "compute_dtype": "bfloat16", "model.video.width": 512,
      "model.video.num_heads": 4, "model.sorter.num_heads": 1},
     "model.sorter has head dimension 512; cuDNN needs .* at most 128"),
])
def test_impossible_values_are_named(overrides, message):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    config_schema.validate(config)


def test_trainer_rejects_a_bad_config_before_creating_the_workdir(tmp_path):
  config = tiny.get_config()
  config.model.video.patch_size = 5
  with pytest.raises(ConfigError, match="patch_size=5"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 12}, "batch_size=12 is not divisible by the 8 devices"),
    ({"mesh.data": 3, "mesh.fsdp": 2}, "does not cover the 8 devices"),
])
def test_batch_or_mesh_that_does_not_fit_the_devices_fails_before_compiling(
    tmp_path, overrides, message):
  """Shapes that depend on the machine, checked when the mesh is built (8 test devices)."""
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  config.data.train_records = str(tmp_path / "never-read-*")
  config.data.tokenizer = "never-read.model"
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("flag, message", [
    ("--config.totl_steps=5", "totl_steps"),  # main.py locks the config: a usage error
    ("--config.eval_every_steps=5", "'eval_every_steps' was replaced by evals.<name>.every_steps"),
])
def test_bad_key_on_the_command_line_stops_main_before_any_work(tmp_path, flag, message):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "main.py"), "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", flag],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_readme_configuration_reference_is_the_generated_one():
  """The README's reference is generated from the schema and the evaluators' options."""
  from tvts_jax import config_reference  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  assert config_reference.in_readme(text) == config_reference.markdown(), (
      "the README's configuration reference is stale: run "
      "`python -m tvts_jax.config_reference --write`")
