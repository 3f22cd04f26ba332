r"""`main.py --mode=eval`: the evaluations of `config.evals` on a checkpoint, an export or a random init.

    python main.py --mode=eval --config=CONFIG --workdir=DIR            # latest checkpoint
    python main.py --mode=eval --workdir=DIR --eval_random_init         # + the random baseline
    python main.py --mode=eval --workdir=DIR --eval_params=encoder.safetensors
    python main.py --mode=eval --workdir=DIR --eval_names=probe,v2v_retrieval

Every evaluation of `config.evals` runs (or those named), whatever its `every_steps`: the same
evaluators the training loop runs (`tvts_jax/evaluators/`). One whose data or part of the model
is missing is skipped, with the reason in the table and the JSON.

Results go to `WORKDIR/eval_results.json` (keyed by source: `checkpoint`, `random_init`,
`export`; a later run replaces its own sources' entries and keeps the others), to TensorBoard
under `WORKDIR/eval/<source>/`, and to stdout as a table, one column per evaluated model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

import jax
import ml_collections
from absl import logging
from flax import nnx

from tvts_jax import config_schema, evaluators, export, sharding
from tvts_jax import workdir as workdir_lib

RESULTS_FILE = "eval_results.json"


@dataclasses.dataclass
class Source:
  """Parameters to evaluate.

  Attributes:
    name: results key ('checkpoint', 'random_init', 'export').
    description: for the table and the JSON.
    step: the training step (None for a random init).
    config: the config that builds their model (the run's, or the export's own).
    params: a pure nested dict: the whole model, or `{'video': ...}` for an encoder export.
  """
  name: str
  description: str
  step: int | None
  config: ml_collections.ConfigDict
  params: Any


def load_source(config: ml_collections.ConfigDict, workdir: str, source: str,
                mesh: jax.sharding.Mesh) -> Source:
  """The parameters named by `source`.

  Args:
    config: the run config.
    workdir: the training workdir.
    source: 'checkpoint' (the workdir's latest), 'random' (a fresh init with config.seed), or
      the path of an export file (`.safetensors` / `.npz`).
    mesh: where the parameters go.
  """
  if source == "checkpoint":
    workdir_lib.check_workdir_config(config, workdir)
    params, step = workdir_lib.restore_params(config, workdir, mesh)
    return Source("checkpoint", f"checkpoint step {step}", step, config, params)
  if source == "random":
    return Source("random_init", f"random init (seed {config.seed})", None, config,
                  workdir_lib.random_params(config, mesh))
  meta, _ = export.read_export(source)
  # The export's own config builds its model; the data shapes fed to it come from `config`.
  workdir_lib.check_same_model(config, meta["config"], source,
                               keys=workdir_lib.DATA_SHAPE_KEYS)
  step = meta.get("step")
  description = f"export {os.path.basename(source)}" + (f" (step {step})" if step else "")
  if meta["contents"] == "full":
    module, model_config = export.load_model(source, compute_dtype=config.compute_dtype)
    params = nnx.split(module)[1].to_pure_dict()
  else:
    encoder = export.load_video_encoder(source, compute_dtype=config.compute_dtype)
    model_config, params = encoder.config, {"video": encoder.params.to_pure_dict()}
  params = jax.device_put(params, sharding.replicated(mesh))
  return Source("export", description, step, model_config, params)


def eval_data(config: ml_collections.ConfigDict, workdir: str) -> evaluators.EvalData:
  """The default records of the evaluations: the run's held-out set, or the demo's splits."""
  d = config.data
  if d.train_records:
    return evaluators.EvalData(heldout=d.eval_records, tokenizer=d.tokenizer)
  from tvts_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return evaluators.EvalData.from_run(input_pipeline.resolve_data(config, workdir))


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """One row per metric, one column per evaluated model."""
  names = list(results)
  metrics = list(dict.fromkeys(m for r in results.values() for m in r["metrics"]))
  header = ["metric"] + [results[n]["description"] for n in names]
  rows = [[m] + [f"{results[n]['metrics'][m]:.4f}" if m in results[n]["metrics"] else "-"
                 for n in names] for m in metrics]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
  for n in names:
    for name, why in results[n]["skipped"].items():
      out.append(f"({results[n]['description']}: {name} skipped: {why})")
  return "\n".join(out)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, source: str = "checkpoint",
             random_init: bool = False, names: Iterable[str] | None = None,
             images: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
  """`main.py --mode=eval`: runs the evaluations, writes JSON and TensorBoard, prints a table.

  Args:
    config: the run config (its model must match the workdir's / export's).
    workdir: the training workdir; results are written there.
    source: 'checkpoint', 'random' or an export file path (see `load_source`).
    random_init: also evaluate a random init of the same config, the same way (the baseline
      that the pre-training has to beat).
    names: the evaluations of `config.evals` to run (default all).
    images: if given, filled with the evaluators' figures, {source name: {'<eval>/<image>':
      uint8 [H, W, 3]}} (they also go to TensorBoard).

  Returns:
    {source name: {'description', 'step', 'metrics': {'<eval>/<metric>': value},
    'skipped': {eval: reason}}}.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  config_schema.validate(config)
  evaluators.check_config(config)
  tf.io.gfile.makedirs(workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(int(config.data.eval_batch_size or config.batch_size), mesh)
  data = eval_data(config, workdir)
  sources = [source] + (["random"] if random_init and source != "random" else [])
  results = {}
  for src in sources:
    loaded = load_source(config, workdir, src, mesh)
    # The run's config decides the data and the evaluations; the source's builds the model.
    fns = evaluators.ModelFns(loaded.config, mesh)
    ctx = evaluators.Context(config, mesh, fns, data)
    out = evaluators.run(evaluators.build(ctx, names), loaded.params,
                         log_prefix=f"eval {loaded.name}")
    results[loaded.name] = {"description": loaded.description, "step": loaded.step,
                            "metrics": out["metrics"], "skipped": out["skipped"]}
    if images is not None:
      images[loaded.name] = out["images"]
    writer = metric_writers.create_default_writer(
        os.path.join(workdir, "eval", loaded.name), just_logging=jax.process_index() > 0)
    writer.write_scalars(loaded.step or 0, out["metrics"])
    if out["images"]:
      writer.write_images(loaded.step or 0, {k: v[None] for k, v in out["images"].items()})
    writer.flush()
  table = format_table(results)
  logging.info("evaluation results written to %s", os.path.join(workdir, RESULTS_FILE))
  if jax.process_index() == 0:
    path = os.path.join(workdir, RESULTS_FILE)
    saved = {}
    if tf.io.gfile.exists(path):  # keep the other sources' latest results
      with tf.io.gfile.GFile(path) as f:
        saved = json.load(f).get("results", {})
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump({"results": {**saved, **results}, "data": dataclasses.asdict(data),
                 "evals": config.evals.to_dict()}, f, indent=2, default=str)
    print(table, flush=True)
  return results
