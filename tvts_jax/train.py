"""The trainer: `train_and_evaluate(config, workdir)`, one jitted sharded step, one loop.

Flow of one step: the input pipeline yields this host's slice of the batch (numpy) ->
`sharding.global_batch` makes global arrays on the (data, fsdp) mesh -> `train_step` (jitted,
state donated) runs the model, the losses and AdamW -> metrics are fetched every
`log_every_steps`. In between, the loop only waits for the step before last to finish before it
takes the next batch, so it never runs more than one step ahead of the device and its time in
`next(train_iter)` is time the device can go idle: `input_meter` turns it into
`train/data_wait_fraction` and the input and step rates of every logged interval.

The train state is a plain dict `{step, params, opt_state, nonfinite}`; `params` is the model's
state as a pure nested dict of arrays (`nnx.State.to_pure_dict()`; `nnx.merge(graphdef,
params)` rebuilds the model inside the step). Plain dicts and optax's namedtuples flatten in
JAX's C++ pytree code, where an `nnx.State` of Variables costs milliseconds of Python a step to
flatten and unflatten at the jit boundary (docs/performance.md). It is created already
sharded: abstract shapes (`jax.eval_shape`) -> shardings by the fsdp rule -> a jitted init
with those output shardings, so the full parameters never sit on one device.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from tvts_jax import checkpoint as ckpt_lib
from tvts_jax import config_schema, evaluators, input_meter, losses, optim, sharding
from tvts_jax.models import tvts as tvts_model

# Keys of the batch dict the model consumes; the rest (labels) only travel to evaluation.
MODEL_KEYS = ("video", "text_ids", "text_mask", "order", "valid")


def _init_state(config, tx, rng):
  params = tvts_model.init_params(config, rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "nonfinite": jnp.zeros((), jnp.int32)}


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying the matching `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_train_state(config, mesh, tx):
  """The train state's shapes and shardings on `mesh`, allocating nothing.

  Returns:
    (abstract state: ShapeDtypeStructs with shardings, shardings, graphdef).
  """
  graphdef, _ = tvts_model.abstract_model(config)
  abstract = jax.eval_shape(functools.partial(_init_state, config, tx),
                            jax.random.key(config.seed))
  shardings = sharding.tree_shardings(mesh, abstract)
  return with_shardings(abstract, shardings), shardings, graphdef


def create_train_state(config, mesh, tx):
  """Creates the train state sharded on `mesh`; returns (state, shardings, graphdef)."""
  _, shardings, graphdef = abstract_train_state(config, mesh, tx)
  state = jax.jit(functools.partial(_init_state, config, tx),
                  out_shardings=shardings)(jax.random.key(config.seed))
  return state, shardings, graphdef


def model_outputs_and_loss(graphdef, params, batch, rng, config, *, keep_tokens=False):
  """Runs the model on a batch and computes the TVTS loss; returns (loss, (metrics, out))."""
  model = nnx.merge(graphdef, params)
  out = model(batch["video"], batch["text_ids"], batch["text_mask"],
              keep_rng=None if keep_tokens else rng)
  loss, metrics = losses.total_loss(out, batch["order"], batch["valid"], config)
  return loss, (metrics, out)


def train_step(state, batch, *, graphdef, tx, config):
  """One AdamW step on the global batch. A non-finite loss or gradient skips the update.

  Parameters that `optim.param_groups` freeze get no gradient (the loss sees them through a
  stop-gradient, so their weight gradients are never computed) and are passed through as
  they are.
  """
  rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])
  frozen = optim.frozen_mask(config, state["params"])  # static: decided by the paths alone
  hold = lambda tree: jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, tree,
                                   frozen)
  grad_fn = jax.value_and_grad(
      lambda p: model_outputs_and_loss(graphdef, hold(p), batch, rng, config), has_aux=True)
  (loss, (metrics, _)), grads = grad_fn(state["params"])
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    return jax.tree.map(lambda n, p, f: p if f else n, new, params, frozen), opt_state

  # Keep the old state when the step is not finite: NaNs never reach params or checkpoints.
  # A cond rather than a per-leaf `where(finite, new, old)`: the select reads the old state
  # after the update wrote it, so XLA copies the donated state (a second copy of the
  # optimizer state and an extra pass over it every step); the cond updates in place.
  params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state["params"],
                                   state["opt_state"])
  new_state = {
      "step": state["step"] + 1,
      "params": params,
      "opt_state": opt_state,
      "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
  }
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                 learning_rate=optim.make_schedule(config)(state["step"]),
                 valid_fraction=batch["valid"].astype(jnp.float32).mean())
  return new_state, metrics


def jit_train_step(config, mesh, graphdef, tx, state_shardings):
  """`train_step` jitted on `mesh`: state sharded as given and donated, batch over the mesh."""
  return jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, config=config),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


class Trainer:
  """Holds the compiled functions for one config and mesh."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    # Parameter groups are checked on the abstract parameters, before anything is allocated.
    self.param_groups = (optim.describe_groups(
        config, tvts_model.abstract_model(config)[1].to_pure_dict())
                         if config.optim.param_groups else [])
    self.tx = optim.make_optimizer(config)
    self.state, self.state_shardings, self.graphdef = create_train_state(config, mesh, self.tx)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self._train_step = jit_train_step(config, mesh, self.graphdef, self.tx,
                                      self.state_shardings)

  def abstract_state(self):
    return with_shardings(self.state, self.state_shardings)

  def step(self, local_batch: dict[str, np.ndarray]):
    batch = sharding.global_batch({k: local_batch[k] for k in MODEL_KEYS}, self.mesh)
    self.state, metrics = self._train_step(self.state, batch)
    return metrics

# TensorFlow (tf.io.gfile, tf.data) and clu (which imports it) are needed by the training loop
# only, not by the state and step: the benchmark and library users import this module without
# them.


def _write_config(config, workdir: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def _prepare_workdir(config, workdir: str) -> None:
  """Creates the workdir and writes config.json there, so that a workdir that cannot be written
  fails in the first second with its name, not at the first checkpoint after hours of work."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.io.gfile.makedirs(workdir)
    _write_config(config, workdir)
  except tf.errors.OpError as e:
    raise OSError(f"the workdir {workdir!r} is not writable ({e.message}); it holds the "
                  "checkpoints and metrics: pass a writable --workdir") from e


def _check_vocab(config, tokenizer_path: str) -> None:
  """The tokenizer fits the text tower: at most its vocabulary, exactly it for a pretrained
  vocabulary (a tokenizer.json), whose token ids index the tower's embedding rows."""
  from data_pipelines import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  tok = tok_lib.load(tokenizer_path)
  tok_lib.check_vocab(tok, config.model.text.vocab_size,
                      exact=isinstance(tok, tok_lib.HFTokenizer))


def _eval_and_write(evals, params, writer, step) -> dict[str, float]:
  out = evaluators.run(evals, params, log_prefix=f"eval @{step}")
  writer.write_scalars(step, out["metrics"])
  if out["images"]:
    writer.write_images(step, {k: v[None] for k, v in out["images"].items()})
  for name, evaluator in evals.items():
    shown = [k for k in evaluator.SUMMARY if f"{name}/{k}" in out["metrics"]]
    if shown:
      logging.info("eval @%d: %s: %s", step, name, ", ".join(
          f"{k} {out['metrics'][f'{name}/{k}']:.3f}" for k in shown))
  return out["metrics"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest checkpoint) and evaluates.

  Returns:
    The final step, the last logged train metrics, the last eval results and the history of
    logged (step, mean train loss) pairs (for tests and scripts).
  """
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  from tvts_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config_schema.validate(config)
  evaluators.check_config(config)
  _prepare_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  data = input_pipeline.resolve_data(config, workdir)
  _check_vocab(config, data["tokenizer"])

  trainer = Trainer(config, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    logging.info("resuming from step %d in %s", start_step, checkpointer.directory)
    trainer.state = checkpointer.restore(start_step, trainer.abstract_state())
  elif config.init_from:
    from tvts_jax import convert  # pylint: disable=g-import-not-at-top
    trainer.state["params"] = convert.load_init(config, trainer.state["params"])

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.items() if not hasattr(v, "items")})
  n_params = sum(x.size for x in jax.tree.leaves(trainer.state["params"]))
  logging.info("model: %.2fM parameters; mesh %s; %d process(es)", n_params / 1e6,
               dict(mesh.shape), jax.process_count())
  for line in trainer.param_groups:
    logging.info("optim.param_groups %s", line)

  train_iter: Iterator = input_pipeline.make_train_iterator(
      config, data["train"], data["tokenizer"], start_step=start_step)
  evals = {}
  if any(e.every_steps for e in config.evals.values()):
    ctx = evaluators.Context(config, mesh, evaluators.ModelFns(config, mesh),
                             evaluators.EvalData.from_run(data))
    evals = evaluators.build(ctx, periodic=True)
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  preempted = ckpt_lib.PreemptionFlag().install()
  pending, last_metrics, eval_results, history = [], {}, {}, []
  step = start_step
  meter = input_meter.InputMeter(config.batch_size, config.batch_size // jax.process_count(),
                                 process_count=jax.process_count())
  try:
    while step < config.total_steps:
      if len(pending) >= 2:
        # At most one step queued ahead of the one dispatched next: the loop cannot run ahead
        # of the device, so the time in next() is time the device can go idle (input_meter).
        jax.block_until_ready(pending[-2]["loss"])
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        metrics = trainer.step(meter.next(train_iter))
      step += 1
      pending.append(metrics)
      report(step)
      if config.nonfinite == "stop" and not bool(metrics["finite"]):
        checkpointer.wait()
        raise FloatingPointError(f"non-finite loss or gradient at step {step} (the update "
                                 "was not applied); nonfinite='skip' would skip it")
      if step % config.log_every_steps == 0 or step == config.total_steps:
        fetched = jax.device_get(pending)
        last_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        timing = meter.interval()  # after the fetch: the step's device time is in it
        last_metrics.update({k: v for k, v in timing.items() if k != "interval_s"})
        last_metrics["nonfinite_steps"] = float(trainer.state["nonfinite"])
        writer.write_scalars(step, {f"train/{k}": v for k, v in last_metrics.items()})
        history.append((step, last_metrics["loss"]))
        pending = []
      due = {n: e for n, e in evals.items()
             if step % config.evals[n].every_steps == 0 or step == config.total_steps}
      if due:
        with meter.excluded():
          eval_results.update(_eval_and_write(due, trainer.state["params"], writer, step))
      stop = preempted.is_set()
      if jax.process_count() > 1:  # every host must agree to save and stop together
        stop = bool(multihost_utils.process_allgather(np.array(stop)).any())
      if step % config.checkpoint_every_steps == 0 or step == config.total_steps or stop:
        with meter.excluded():
          checkpointer.save(step, trainer.state, force=stop)
      if stop:
        logging.warning("stopping at step %d after a termination signal", step)
        break
  finally:
    preempted.uninstall()
    checkpointer.close()
    writer.flush()
  return {"step": step, "train": last_metrics, "eval": eval_results, "history": history}
