"""Reading a training workdir: its data, its config check, its parameters, its random baseline.

A workdir (`main.py --workdir=DIR`) holds `config.json` (the config the run used), `checkpoints/`
(orbax) and, for the built-in demo, `demo_data/` (`input_pipeline.resolve_data`). The
evaluation (`--mode=eval`) and the exporter (`--mode=export`) read it through this module:

- `check_workdir_config` / `check_same_model`: the given config builds the model the workdir was
  trained with (parameter-shaping keys only);
- `restore_params`: the latest checkpoint's parameters, sharded as in training;
- `random_params`: the parameters training started from (a fresh init with `config.seed`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable

import jax
import ml_collections

from tvts_jax import config_schema, sharding
from tvts_jax.models import tvts as tvts_model

# Keys of config.json that decide the parameter tree: they must agree between the config given
# to the evaluation or export and the config the workdir (or export) was trained with.
DATA_SHAPE_KEYS = ("data.num_frames", "data.image_size", "data.num_clips", "data.text_len")
PARAM_KEYS = ("model",) + DATA_SHAPE_KEYS
# Change no parameter: how blocks are recomputed, which attention kernel runs (a run trained
# with 'cudnn' on a GPU, or before 'auto' was the default, evaluates with 'auto' or 'xla').
_IGNORED_KEYS = ("model.remat", "model.attention")


def _flat_json(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat_json(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _selected(flat: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
  return {k: v for k, v in flat.items()
          if any(k == p or k.startswith(p + ".") for p in keys) and k not in _IGNORED_KEYS}


def check_same_model(config: ml_collections.ConfigDict, trained: dict[str, Any], what: str,
                     keys: Iterable[str] = PARAM_KEYS) -> None:
  """Raises ConfigError if `config` and the `trained` config differ in parameter-shaping keys.

  Args:
    config: the config given to this run.
    trained: the training config as a JSON dict (WORKDIR/config.json, an export's metadata);
      keys it lacks count as their defaults.
    what: names the source in the message.
    keys: the config keys (or groups) compared.
  """
  ours = _selected(_flat_json(json.loads(config.to_json_best_effort())), keys)
  # A key the training config predates had its value of then: today's default, or the legacy
  # one where the default has changed since.
  defaults = {**_flat_json(json.loads(config_schema.base_config().to_json_best_effort())),
              **config_schema.LEGACY_DEFAULTS}
  theirs = _selected({**defaults, **_flat_json(trained)}, keys)
  diffs = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
           for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
  if diffs:
    raise config_schema.ConfigError(
        f"{what} was trained with another model config; pass the training config (the same "
        f"--config and overrides). Differences: {'; '.join(diffs[:8])}")


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks `config` against WORKDIR/config.json (written by the trainer), if there is one."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      check_same_model(config, json.load(f), path)


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   mesh: jax.sharding.Mesh) -> tuple[Any, int]:
  """The parameters of the latest checkpoint in `workdir`, sharded on `mesh` like in training.

  Returns:
    (params as a pure nested dict, step).

  Raises:
    FileNotFoundError: no checkpoint in the workdir.
    checkpoint.CheckpointMismatchError: the checkpoint was written for another config.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tvts_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from tvts_jax import optim, train  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  if not tf.io.gfile.exists(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir} (expected {directory})")
  # The train state's layout ({step, params, opt_state, nonfinite}, train.py), abstractly.
  abstract, _, _ = train.abstract_train_state(config, mesh, optim.make_optimizer(config))
  checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    state = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  return state["params"], int(step)


def random_params(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
  """The from-scratch parameters: training's own init with config.seed (init_from not applied)."""
  init, rng = functools.partial(tvts_model.init_params, config), jax.random.key(config.seed)
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(init, rng))
  return jax.jit(init, out_shardings=shardings)(rng)
