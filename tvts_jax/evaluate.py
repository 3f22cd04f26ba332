r"""Evaluation protocols over a checkpoint, an export file, or a random init of the same config.

    python main.py --mode=eval --config=CONFIG --workdir=DIR            # latest checkpoint
    python main.py --mode=eval --workdir=DIR --eval_random_init         # + the random baseline
    python main.py --mode=eval --workdir=DIR --eval_params=encoder.safetensors

Protocols (`config.eval.protocols`, all by default; each is skipped, with the reason recorded,
when its data or its part of the model is missing):

- `probe`: linear probe. The encoder is frozen and keeps every token; each labelled example is
  read TSN-style (`data.num_frames` equal segments over the example, the middle frame of each;
  the short side resized to `data.resize_short`, a centre `data.image_size` crop) and embedded
  as the CLS token after the final LayerNorm. Features are standardised with the train split's
  statistics; a softmax classifier (full-batch optax L-BFGS, at most `eval.probe_steps`
  iterations) is trained for each L2 penalty of `eval.probe_weight_decays` on all but a held-out
  `eval.probe_holdout_fraction` of the train split, the best on the held-out part is retrained
  on the whole train split, and top-1 / top-5 are measured on the test split.
- `v2v_retrieval`: zero-shot video-to-video retrieval, the paper's SSV2 protocol: cosine
  similarity of the same frozen CLS features, the query itself excluded; R@K is the fraction of
  queries with a video of their own class among the K nearest.
- `sort`: held-out transcript sorting (sort_acc: all K argmax right; per-position accuracy;
  the exact best-permutation variants; Kendall's tau), on `eval.heldout_records`.
- `t2v_retrieval`: text-to-video retrieval on the same held-out set: each example's text
  embedding (the mean of its K transcript projections) against all the set's video
  embeddings; R@1/5/10 and the median rank (rank = 1 + the number of videos scored strictly
  higher than the right one).

Labelled examples: a record with a class label (`label >= 0`, written by
`prepare --labels=folders|csv`) is one example spanning the whole record; a record without one
gives one example per annotated action segment (`segment_labels/starts/ends`), spanning that
segment. The demo data (used when `data.train_records` is empty) is of the second kind: its
videos are sequences of events whose action (appear, move left, grow, ...) is the label, so
the demo probe classifies each event from the frames of that event alone, and telling
"appear" from "disappear" or "grow" from "shrink" needs the temporal order of the frames.

Results go to `WORKDIR/eval_results.json` (keyed by source: `checkpoint`, `random_init`,
`export`; a later run replaces its own sources' entries and keeps the others), to TensorBoard
under `WORKDIR/eval/<source>/`, and to stdout as a table, one column per evaluated model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from flax import nnx

from tvts_jax import config_schema, export, input_pipeline, losses, sharding

RESULTS_FILE = "eval_results.json"
# Keys of config.json that decide the parameter tree: they must agree between the config given
# to the evaluation and the config the workdir (or export) was trained with.
_DATA_SHAPE_KEYS = ("data.num_frames", "data.image_size", "data.num_clips", "data.text_len")
_PARAM_KEYS = ("model",) + _DATA_SHAPE_KEYS
# Change no parameter: how blocks are recomputed, which attention kernel runs (a run trained
# with 'cudnn' on a GPU, or before 'auto' was the default, evaluates with 'auto' or 'xla').
_IGNORED_KEYS = ("model.remat", "model.attention")


# ---------------------------------------------------------------------------------------------
# Metrics (numpy, host side).


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def video_retrieval_metrics(features: np.ndarray, labels: np.ndarray,
                            ks: Iterable[int] = (1, 5, 10),
                            chunk: int = 1024) -> dict[str, float]:
  """Zero-shot video-to-video retrieval by cosine similarity, the query excluded.

  Args:
    features: [N, D] video features.
    labels: int [N] class of each video.
    ks: the cut-offs K.
    chunk: queries scored at once (bounds memory at chunk x N).

  Returns:
    {'R@K': fraction of queries with at least one video of their class among the K most
    similar other videos, ..., 'num_queries': N}. Ties are broken by the lower index.
  """
  f = _l2_normalize(features)
  labels = np.asarray(labels)
  n = len(f)
  if n < 2:
    raise ValueError(f"video retrieval needs at least 2 videos, got {n}")
  ks = sorted(ks)
  kmax = min(ks[-1], n - 1)
  hits = {k: 0 for k in ks}
  for start in range(0, n, chunk):
    sim = f[start:start + chunk] @ f.T
    rows = np.arange(len(sim))
    sim[rows, start + rows] = -np.inf  # the query itself
    # A stable sort of the negated scores: equal scores keep the lower index first.
    top = np.argsort(-sim, axis=1, kind="stable")[:, :kmax]
    match = labels[top] == labels[start + rows][:, None]
    for k in ks:
      hits[k] += int(np.any(match[:, :k], axis=1).sum())
  return {**{f"R@{k}": hits[k] / n for k in ks}, "num_queries": float(n)}


def text_to_video_metrics(text_emb: np.ndarray, video_emb: np.ndarray,
                          ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
  """Text-to-video retrieval: query i's right answer is video i.

  Args:
    text_emb: [N, E] text embeddings (queries).
    video_emb: [N, E] video embeddings (gallery), row i paired with text i.
    ks: the cut-offs K.

  Returns:
    {'R@K': fraction of queries whose video ranks <= K, 'median_rank', 'mean_rank',
    'num_queries'}; rank = 1 + the number of videos scored strictly higher than the right one.
  """
  sim = _l2_normalize(text_emb) @ _l2_normalize(video_emb).T
  right = np.diag(sim)
  ranks = 1 + np.sum(sim > right[:, None], axis=1)
  out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
  out.update(median_rank=float(np.median(ranks)), mean_rank=float(np.mean(ranks)),
             num_queries=float(len(ranks)))
  return out


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k highest logits (k capped at the classes)."""
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


# ---------------------------------------------------------------------------------------------
# Linear probe.


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _fit_linear(x, y, weight_decay, tol, *, num_classes: int, max_steps: int):
  """Softmax regression with an L2 penalty by full-batch L-BFGS; returns (w, b, steps)."""
  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn)
    return optax.apply_updates(p, updates), state

  def going(carry):
    _, state = carry
    count = optax.tree_utils.tree_get(state, "count")
    err = optax.tree_utils.tree_l2_norm(optax.tree_utils.tree_get(state, "grad"))
    # Stops at convergence, and before a converged L-BFGS divides 0 by 0.
    return (count == 0) | ((count < max_steps) & (err >= tol) & jnp.isfinite(err))

  params, state = jax.lax.while_loop(going, step, (params, opt.init(params)))
  return params["w"], params["b"], optax.tree_utils.tree_get(state, "count")


def train_linear_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, *,
                            weight_decay: float, max_steps: int,
                            tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
  """Fits logits = x @ w + b by mean cross-entropy + weight_decay / 2 * ||w||^2.

  Full-batch L-BFGS (a convex problem: it converges in a few hundred steps where Adam needs
  thousands).

  Args:
    x: float [N, D] features (standardised: L-BFGS and the penalty assume comparable scales).
    y: int [N] labels in [0, num_classes).
    num_classes: C.
    weight_decay: L2 penalty coefficient.
    max_steps: L-BFGS iterations at most.
    tol: stop when the gradient's norm falls below this.

  Returns:
    (w [D, C], b [C]) as numpy.

  Raises:
    FloatingPointError: the fit diverged.
  """
  w, b, _ = _fit_linear(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32),
                        jnp.float32(weight_decay), jnp.float32(tol),
                        num_classes=int(num_classes), max_steps=int(max_steps))
  w, b = np.asarray(w), np.asarray(b)
  if not (np.isfinite(w).all() and np.isfinite(b).all()):
    raise FloatingPointError(f"the linear probe diverged (weight_decay={weight_decay})")
  return w, b


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, weight_decays: Iterable[float], max_steps: int,
                 holdout_fraction: float, seed: int = 0) -> dict[str, float]:
  """The linear-probe protocol on precomputed features (see the module docstring).

  Args:
    train_x, train_y: train split features [N, D] and int labels [N].
    test_x, test_y: test split.
    weight_decays: L2 penalties to sweep; the first is used when there is no held-out part.
    max_steps: L-BFGS iterations at most per fit (`train_linear_classifier`).
    holdout_fraction: part of the train split held out to choose the penalty.
    seed: the held-out split.

  Returns:
    top1, top5 (test), weight_decay (chosen), holdout_top1@<wd> per swept value, num_train,
    num_test, num_classes and chance_top1 (the test frequency of its most common class).
  """
  train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
  if len(train_x) == 0 or len(test_x) == 0:
    raise ValueError(f"linear probe needs train and test examples, got {len(train_x)} and "
                     f"{len(test_x)}")
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  mean = train_x.mean(axis=0)
  std = train_x.std(axis=0) + 1e-6
  train_x = (np.asarray(train_x, np.float32) - mean) / std
  test_x = (np.asarray(test_x, np.float32) - mean) / std
  fit = functools.partial(train_linear_classifier, num_classes=num_classes,
                          max_steps=max_steps)
  weight_decays = [float(w) for w in weight_decays]
  out: dict[str, float] = {}
  n_hold = int(round(holdout_fraction * len(train_x)))
  best = weight_decays[0]
  if len(weight_decays) > 1 and 0 < n_hold < len(train_x):
    perm = np.random.default_rng(seed).permutation(len(train_x))
    hold, rest = perm[:n_hold], perm[n_hold:]
    scores = []
    for wd in weight_decays:
      w, b = fit(train_x[rest], train_y[rest], weight_decay=wd)
      scores.append(topk_accuracy(train_x[hold] @ w + b, train_y[hold], 1))
      out[f"holdout_top1@{wd:g}"] = scores[-1]
    best = weight_decays[int(np.argmax(scores))]  # the first of equals: the list's order
  w, b = fit(train_x, train_y, weight_decay=best)
  logits = test_x @ w + b
  counts = np.bincount(test_y, minlength=num_classes)
  out.update(top1=topk_accuracy(logits, test_y, 1), top5=topk_accuracy(logits, test_y, 5),
             weight_decay=best, num_train=float(len(train_x)), num_test=float(len(test_x)),
             num_classes=float(num_classes), chance_top1=float(counts.max() / len(test_y)))
  return out


# ---------------------------------------------------------------------------------------------
# What to evaluate: a checkpoint, a random init, or an export file.


@dataclasses.dataclass
class EvalModel:
  """Parameters to evaluate.

  Attributes:
    name: results key ('checkpoint', 'random_init', 'export').
    description: for the table and the JSON.
    step: the training step (None for a random init).
    video_graphdef, video_params: the video tower (`nnx.split`).
    graphdef, params: the whole TVTS model, or None for an encoder-only export.
  """
  name: str
  description: str
  step: int | None
  video_graphdef: Any
  video_params: Any
  graphdef: Any = None
  params: Any = None


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
                     keys: Iterable[str] = _PARAM_KEYS) -> None:
  """Raises ConfigError if `config` and the `trained` config differ in parameter-shaping keys.

  Args:
    config: the config given to this run.
    trained: the training config as a JSON dict (WORKDIR/config.json, an export's metadata);
      keys it lacks count as their defaults.
    what: names the source in the message.
    keys: the config keys (or groups) compared.
  """
  ours = _selected(_flat_json(json.loads(config.to_json_best_effort())), keys)
  # A key the training config predates had its default value then (defaults keep behaviour).
  defaults = _flat_json(json.loads(config_schema.base_config().to_json_best_effort()))
  theirs = _selected({**defaults, **_flat_json(trained)}, keys)
  diffs = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
           for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
  if diffs:
    raise config_schema.ConfigError(
        f"{what} was trained with another model config; pass the training config (the same "
        f"--config and overrides). Differences: {'; '.join(diffs[:8])}")


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks `config` against WORKDIR/config.json (written by the trainer), if there is one."""
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
  from tvts_jax import train  # pylint: disable=g-import-not-at-top
  init, rng = functools.partial(train.init_params, config), jax.random.key(config.seed)
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(init, rng))
  return jax.jit(init, out_shardings=shardings)(rng)


def _from_tvts_params(name: str, description: str, step: int | None, config, params) -> EvalModel:
  from tvts_jax import train  # pylint: disable=g-import-not-at-top
  graphdef, _ = train.abstract_model(config)
  model = nnx.merge(graphdef, params)
  video_graphdef, video_params = nnx.split(model.video)
  return EvalModel(name, description, step, video_graphdef, video_params, graphdef, params)


def load_eval_model(config: ml_collections.ConfigDict, workdir: str, source: str,
                    mesh: jax.sharding.Mesh) -> EvalModel:
  """The parameters named by `source`.

  Args:
    config: the run config.
    workdir: the training workdir.
    source: 'checkpoint' (the workdir's latest), 'random' (a fresh init with config.seed), or
      the path of an export file (`.safetensors` / `.npz`).
    mesh: where the parameters go.

  Returns:
    An `EvalModel`.
  """
  if source == "checkpoint":
    check_workdir_config(config, workdir)
    params, step = restore_params(config, workdir, mesh)
    return _from_tvts_params("checkpoint", f"checkpoint step {step}", step, config, params)
  if source == "random":
    return _from_tvts_params("random_init", f"random init (seed {config.seed})", None, config,
                             random_params(config, mesh))
  meta, _ = export.read_export(source)
  # The export's own config builds its model; the data shapes fed to it come from `config`.
  check_same_model(config, meta["config"], source, keys=_DATA_SHAPE_KEYS)
  replicated = sharding.replicated(mesh)
  step = meta.get("step")
  description = f"export {os.path.basename(source)}" + (f" (step {step})" if step else "")
  if meta["contents"] == "full":
    model, _ = export.load_model(source, compute_dtype=config.compute_dtype)
    graphdef, params = nnx.split(model)
    params = jax.device_put(params, replicated)
    video_graphdef, video_params = nnx.split(nnx.merge(graphdef, params).video)
    return EvalModel("export", description, step, video_graphdef, video_params, graphdef,
                     params)
  encoder = export.load_video_encoder(source, compute_dtype=config.compute_dtype)
  return EvalModel("export", description, step, encoder.graphdef,
                   jax.device_put(encoder.params, replicated))


# ---------------------------------------------------------------------------------------------
# Running the protocols.


class SkipProtocol(Exception):
  """A protocol that cannot run with this data or model (the reason is recorded)."""


def resolve_eval_data(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Record globs of each evaluation set and the tokenizer ('' where none is configured).

  With the demo data (empty data.train_records) the demo's train split is the probe's train
  set and its eval split the probe's test set and the held-out set, unless eval.* say otherwise.
  """
  e, d = config.eval, config.data
  demo: dict[str, str] = {}
  if not d.train_records:
    from tvts_jax import train  # pylint: disable=g-import-not-at-top
    paths = train.resolve_data(config, workdir)
    demo = dict(probe_train=paths["train"], probe_test=paths["eval"], heldout=paths["eval"],
                tokenizer=paths["tokenizer"])
  probe_test = e.probe_test_records or demo.get("probe_test", "")
  return dict(
      probe_train=e.probe_train_records or demo.get("probe_train", ""),
      probe_test=probe_test,
      retrieval=e.retrieval_records or probe_test,
      heldout=e.heldout_records or d.eval_records or demo.get("heldout", ""),
      tokenizer=d.tokenizer or demo.get("tokenizer", ""))


class Evaluator:
  """Runs the configured protocols for one `EvalModel`, sharing features between them."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               data: dict[str, str], model: EvalModel):
    self.config, self.mesh, self.data, self.model = config, mesh, data, model
    sharding.check_batch_size(int(config.data.eval_batch_size or config.batch_size), mesh)
    self._features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self._heldout: dict[str, np.ndarray] | None = None
    replicated = sharding.replicated(mesh)
    vg = model.video_graphdef

    def video_fn(params, batch):
      return nnx.merge(vg, params)(batch["video"])[:, 0], batch["label"], batch["valid"]

    self._video_fn = jax.jit(video_fn, out_shardings=replicated)
    if model.graphdef is not None:
      g = model.graphdef

      def heldout_fn(params, batch):
        out = nnx.merge(g, params)(batch["video"], batch["text_ids"], batch["text_mask"])
        return dict(sort_logits=out["sort_logits"], video_emb=out["video_emb"],
                    text_emb=out["text_emb"], order=batch["order"], valid=batch["valid"])

      self._heldout_fn = jax.jit(heldout_fn, out_shardings=replicated)

  def features(self, records_pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """Frozen CLS features and labels of a labelled record set (computed once per set)."""
    if records_pattern not in self._features:
      batches = input_pipeline.make_labelled_iterator(
          self.config, records_pattern, max_examples=int(self.config.eval.max_examples))
      feats, labels = [], []
      for local in batches:
        batch = sharding.global_batch(local, self.mesh)
        f, y, valid = map(export.to_host, self._video_fn(self.model.video_params, batch))
        feats.append(f[valid])
        labels.append(y[valid])
      self._features[records_pattern] = (np.concatenate(feats), np.concatenate(labels))
      logging.info("eval %s: %d features of %s", self.model.name,
                   len(self._features[records_pattern][0]), records_pattern)
    return self._features[records_pattern]

  def heldout(self) -> dict[str, np.ndarray]:
    """Sorter logits and embeddings of the valid held-out examples (computed once)."""
    if self._heldout is None:
      batches = input_pipeline.make_eval_iterator(self.config, self.data["heldout"],
                                                  self.data["tokenizer"])
      parts = []
      for local in batches:
        batch = sharding.global_batch(
            {k: local[k] for k in ("video", "text_ids", "text_mask", "order", "valid")},
            self.mesh)
        out = jax.tree.map(export.to_host, self._heldout_fn(self.model.params, batch))
        parts.append({k: v[out["valid"]] for k, v in out.items()})
      self._heldout = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return self._heldout

  def _need(self, *keys: str) -> None:
    hints = dict(probe_train="eval.probe_train_records", probe_test="eval.probe_test_records",
                 retrieval="eval.retrieval_records or eval.probe_test_records",
                 heldout="eval.heldout_records or data.eval_records",
                 tokenizer="data.tokenizer")
    for key in keys:
      if not self.data.get(key):
        raise SkipProtocol(f"no {key} data: set {hints[key]}")

  def _need_full_model(self) -> None:
    if self.model.graphdef is None:
      raise SkipProtocol("the export holds the video encoder only (export with --export_full)")

  def probe(self) -> dict[str, float]:
    self._need("probe_train", "probe_test")
    e = self.config.eval
    train_x, train_y = self.features(self.data["probe_train"])
    test_x, test_y = self.features(self.data["probe_test"])
    return linear_probe(train_x, train_y, test_x, test_y,
                        weight_decays=e.probe_weight_decays, max_steps=e.probe_steps,
                        holdout_fraction=e.probe_holdout_fraction, seed=self.config.seed)

  def v2v_retrieval(self) -> dict[str, float]:
    self._need("retrieval")
    return video_retrieval_metrics(*self.features(self.data["retrieval"]))

  def sort(self) -> dict[str, float]:
    self._need("heldout", "tokenizer")
    self._need_full_model()
    out = self.heldout()
    if not len(out["order"]):
      raise SkipProtocol("no valid held-out example")
    metrics = losses.sort_metrics(jnp.asarray(out["sort_logits"]), jnp.asarray(out["order"]),
                                  jnp.ones(len(out["order"]), bool))
    k = out["order"].shape[1]
    return {**{name: float(v) for name, v in metrics.items()},
            "chance_sort_acc": 1.0 / math.factorial(k), "num_examples": float(len(out["order"]))}

  def t2v_retrieval(self) -> dict[str, float]:
    self._need("heldout", "tokenizer")
    self._need_full_model()
    out = self.heldout()
    if len(out["order"]) < 2:
      raise SkipProtocol("fewer than 2 valid held-out examples")
    return text_to_video_metrics(out["text_emb"], out["video_emb"])

  def run(self, protocols: Iterable[str]) -> dict[str, Any]:
    """Runs `protocols`; returns {'metrics': {'protocol/metric': v}, 'skipped': {p: why}}."""
    metrics, skipped = {}, {}
    for name in protocols:
      try:
        result = PROTOCOLS[name](self)
      except SkipProtocol as e:
        skipped[name] = str(e)
        logging.warning("eval %s: %s skipped: %s", self.model.name, name, e)
        continue
      metrics.update({f"{name}/{k}": float(v) for k, v in result.items()})
    return {"metrics": metrics, "skipped": skipped}


# `eval.protocols` name -> the Evaluator method that runs it.
PROTOCOLS: dict[str, Callable[[Evaluator], dict[str, float]]] = {
    "probe": Evaluator.probe,
    "v2v_retrieval": Evaluator.v2v_retrieval,
    "sort": Evaluator.sort,
    "t2v_retrieval": Evaluator.t2v_retrieval,
}
assert set(PROTOCOLS) == set(config_schema.EVAL_PROTOCOLS)


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
    for protocol, why in results[n]["skipped"].items():
      out.append(f"({results[n]['description']}: {protocol} skipped: {why})")
  return "\n".join(out)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, source: str = "checkpoint",
             random_init: bool = False) -> dict[str, dict[str, Any]]:
  """`main.py --mode=eval`: runs the protocols, writes JSON and TensorBoard, prints a table.

  Args:
    config: the run config (its model must match the workdir's / export's).
    workdir: the training workdir; results are written there.
    source: 'checkpoint', 'random' or an export file path (see `load_eval_model`).
    random_init: also evaluate a random init of the same config, the same way (the baseline
      that the pre-training has to beat).

  Returns:
    {name: {'description', 'step', 'metrics': {'protocol/metric': value}, 'skipped'}}.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  config_schema.validate(config)
  tf.io.gfile.makedirs(workdir)
  mesh = sharding.make_mesh(config.mesh)
  protocols = [p.strip() for p in config.eval.protocols.split(",") if p.strip()]
  data = resolve_eval_data(config, workdir)
  sources = [source] + (["random"] if random_init and source != "random" else [])
  results = {}
  for src in sources:
    model = load_eval_model(config, workdir, src, mesh)
    run = Evaluator(config, mesh, data, model).run(protocols)
    results[model.name] = {"description": model.description, "step": model.step, **run}
    writer = metric_writers.create_default_writer(
        os.path.join(workdir, "eval", model.name), just_logging=jax.process_index() > 0)
    writer.write_scalars(model.step or 0, run["metrics"])
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
      json.dump({"results": {**saved, **results}, "data": data,
                 "eval_config": config.eval.to_dict()}, f, indent=2, default=str)
    print(table, flush=True)
  return results
