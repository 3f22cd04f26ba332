"""What every evaluator shares: the model's jitted functions, where the data is, a feature cache.

An evaluator is built once per run from its options (`config.evals.<name>`) and a `Context`,
and `run(params)` yields `(metric, value)` pairs for one set of parameters. `params` is the
model's parameters as a pure nested dict, the train state's layout: the whole TVTS model
(`{'video': ..., 'text': ..., 'sorter': ..., ...}`) or, for an encoder-only export, only
`{'video': ...}`. An evaluator that cannot run (no records configured, no text tower in the
parameters) raises `SkipEvaluation` with the reason, which the caller records.

Several evaluators often read the same records with the same parameters (the linear probe and
video-to-video retrieval read the same labelled videos; sorting and text-to-video retrieval the
same held-out examples): `Cache` keeps what one set of parameters produced, so each set of
records goes through the model once per evaluation round.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tvts_jax import config_schema, sharding
from tvts_jax.models import tvts as tvts_model

# The keys of the batch dict the full model consumes on held-out examples.
HELDOUT_KEYS = ("video", "text_ids", "text_mask", "order", "valid")


class SkipEvaluation(Exception):
  """An evaluation that cannot run with this data or these parameters (the reason is kept)."""


@dataclasses.dataclass(frozen=True)
class EvalData:
  """Where an evaluation's records come from when its own options leave them empty.

  Attributes:
    heldout: held-out TVTS examples (narrated videos): `data.eval_records`, or the demo's eval
      split.
    labelled_train, labelled_test: labelled videos for probes and retrieval; only the demo
      has defaults (its train / eval splits, whose action segments are labelled).
    tokenizer: the run's tokenizer (`data.tokenizer`, or the demo's).
  """
  heldout: str = ""
  labelled_train: str = ""
  labelled_test: str = ""
  tokenizer: str = ""

  @classmethod
  def from_run(cls, data: dict[str, Any]) -> "EvalData":
    """From `input_pipeline.resolve_data`'s result."""
    demo = bool(data.get("demo"))
    return cls(heldout=data.get("eval") or "",
               labelled_train=data["train"] if demo else "",
               labelled_test=(data.get("eval") or "") if demo else "",
               tokenizer=data.get("tokenizer") or "")


class Cache:
  """Host-side results of one set of parameters, shared by the evaluators of one round.

  A call with other parameters (another object) starts afresh, so a cache can live as long
  as the evaluators and never serves one round's features to the next.
  """

  def __init__(self):
    self._params = None
    self._values: dict[Any, Any] = {}

  def get(self, params: Any, key: Any, compute: Callable[[], Any]) -> Any:
    """The value of `key` for `params`, computed on first use."""
    if params is not self._params:
      self._params, self._values = params, {}
    if key not in self._values:
      self._values[key] = compute()
    return self._values[key]

  def peek(self, params: Any, key: Any) -> Any:
    """The value of `key` for `params` if it was computed, else None."""
    return self._values.get(key) if params is self._params else None


def shuffle_frames(video: jax.Array, rng: jax.Array) -> jax.Array:
  """Shuffles each video's frames in time: the control that the model uses the video."""
  perms = jax.vmap(lambda k: jax.random.permutation(k, video.shape[1]))(
      jax.random.split(rng, video.shape[0]))
  return jax.numpy.take_along_axis(video, perms[:, :, None, None, None], axis=1)


class ModelFns:
  """The model's functions evaluators call, jitted on one mesh; parameters are arguments.

  Every output is replicated, so that `sharding.to_host` reads it on every host.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    model = nnx.eval_shape(lambda: tvts_model.build_model(config))
    graphdef, _ = nnx.split(model)
    video_graphdef, _ = nnx.split(model.video)
    replicated = sharding.replicated(mesh)
    seed = int(config.seed)

    def video_tokens(params, video):
      return nnx.merge(video_graphdef, params["video"])(video)

    def heldout(params, batch, shuffled):
      video = batch["video"]
      if shuffled:
        video = shuffle_frames(video, jax.random.key(seed + 1))
      out = nnx.merge(graphdef, params)(video, batch["text_ids"], batch["text_mask"])
      return dict(sort_logits=out["sort_logits"], video_emb=out["video_emb"],
                  text_emb=out["text_emb"], order=batch["order"], valid=batch["valid"])

    def video_embedding(params, cls):
      return nnx.merge(graphdef, params).video_embedding(cls)

    def text_embedding(params, ids, mask):
      model = nnx.merge(graphdef, params)
      return model.text_embedding(model.encode_text(ids[:, None], mask[:, None]))

    self._video_emb = jax.jit(video_embedding, out_shardings=replicated)
    self._text_emb = jax.jit(text_embedding, out_shardings=replicated)
    self._tokens = jax.jit(video_tokens, out_shardings=replicated)
    self._features = jax.jit(lambda p, v: video_tokens(p, v)[:, 0], out_shardings=replicated)
    self._heldout = jax.jit(heldout, static_argnums=(2,), out_shardings=replicated)

  @staticmethod
  def has_full_model(params: Any) -> bool:
    """Whether `params` hold the text tower and the sorter (not an encoder-only export)."""
    return all(k in params for k in ("text", "sorter"))

  def require_full_model(self, params: Any) -> None:
    if not self.has_full_model(params):
      raise SkipEvaluation("the parameters hold the video encoder only (export with "
                           "--export_full for the whole model)")

  def video_features(self, params, batch) -> np.ndarray:
    """[B, D]: the CLS token of the video tower's output, every patch kept."""
    return sharding.to_host(self._features(params, batch["video"]))

  def video_tokens(self, params, batch) -> np.ndarray:
    """[B, N, D]: every output token of the video tower (CLS first), every patch kept."""
    return sharding.to_host(self._tokens(params, batch["video"]))

  def video_embedding(self, params, cls: np.ndarray) -> np.ndarray:
    """[N, E]: the contrastive embedding of videos from their CLS features (`video_features`)."""
    self.require_full_model(params)
    return sharding.to_host(self._video_emb(params, jnp.asarray(cls)))

  def text_embedding(self, params, ids, mask) -> np.ndarray:
    """[N, E]: the contrastive embedding of texts, each tokenized text ([N, L]) one query."""
    self.require_full_model(params)
    return sharding.to_host(self._text_emb(params, ids, mask))

  def heldout(self, params, batch, shuffled: bool = False) -> dict[str, np.ndarray]:
    """Sort logits, contrastive embeddings, order and valid of held-out TVTS examples."""
    return jax.tree.map(sharding.to_host, self._heldout(params, batch, shuffled))


@dataclasses.dataclass
class Context:
  """What an evaluator is built from besides its own options."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  fns: ModelFns
  data: EvalData
  cache: Cache = dataclasses.field(default_factory=Cache)

  @property
  def eval_batch_size(self) -> int:
    """The global batch of every evaluation (`data.eval_batch_size`, 0: `batch_size`)."""
    return int(self.config.data.eval_batch_size or self.config.batch_size)


class Evaluator:
  """The small interface every evaluator has; subclasses set OPTIONS and write `run`.

  Attributes:
    OPTIONS: option name -> (default, meaning), besides `type` and `every_steps` (which every
      evaluation has). `config.evals.<name>` holds exactly these keys.
    SUMMARY: the metrics the training loop's log line shows.
  """
  OPTIONS: dict[str, tuple[Any, str]] = {}
  SUMMARY: tuple[str, ...] = ()  # the metrics of the one-line log during training

  def __init__(self, name: str, options: ml_collections.ConfigDict, ctx: Context):
    self.name, self.options, self.ctx = name, options, ctx

  @classmethod
  def check(cls, name: str, options: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for option values this evaluator cannot run with."""

  def records(self, option: str, default: str) -> str:
    """The records of `option`, else `default` (an `EvalData` field), else SkipEvaluation."""
    records = self.options[option] or default
    if not records:
      raise SkipEvaluation(f"no records: set evals.{self.name}.{option}")
    return records

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    raise NotImplementedError

  # Shared readers -------------------------------------------------------------------------

  def labelled_batches(self, records: str, max_examples: int = 0,
                       captions: bool = False):
    """Global batches of labelled videos (`labelled.make_labelled_iterator`).

    With `captions`, each record's caption is tokenized on its host (`caption_ids`,
    `caption_mask` [B, L]; `has_caption` [B]) so that it travels as arrays like the rest of
    the batch.
    """
    from tvts_jax import labelled  # pylint: disable=g-import-not-at-top
    ctx = self.ctx
    for local in labelled.make_labelled_iterator(ctx.config, records,
                                                 max_examples=int(max_examples)):
      texts = local.pop("caption")
      if captions:
        texts = [t.decode() for t in texts]
        local["caption_ids"], local["caption_mask"] = self.tokenize(texts)
        local["has_caption"] = np.array([bool(t.strip()) for t in texts])
      yield sharding.global_batch(local, ctx.mesh)

  def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [N, data.text_len] with the run's tokenizer."""
    from data_pipelines import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    if not self.ctx.data.tokenizer:
      raise SkipEvaluation("no tokenizer: set data.tokenizer")
    return tok_lib.load_cached(self.ctx.data.tokenizer).encode(
        list(texts), int(self.ctx.config.data.text_len))

  def labelled_features(self, params, records: str,
                        max_examples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frozen CLS features [N, D] and labels [N] of a labelled set (once per parameters)."""
    tokens = self.ctx.cache.peek(params, ("tokens", records, int(max_examples)))
    if tokens is not None:  # the attentive probe kept every token: the CLS is the first
      return tokens[0][:, 0], tokens[1]

    def compute():
      feats, labels = [], []
      for batch in self.labelled_batches(records, max_examples):
        valid = sharding.to_host(batch["valid"])
        feats.append(self.ctx.fns.video_features(params, batch)[valid])
        labels.append(sharding.to_host(batch["label"])[valid])
      return np.concatenate(feats), np.concatenate(labels)

    return self.ctx.cache.get(params, ("features", records, int(max_examples)), compute)

  def heldout_outputs(self, params, records: str, shuffled: bool = False
                      ) -> dict[str, np.ndarray]:
    """The full model's outputs on the valid held-out examples of `records` (cached)."""
    from tvts_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    ctx = self.ctx
    ctx.fns.require_full_model(params)
    if not ctx.data.tokenizer:
      raise SkipEvaluation("no tokenizer: set data.tokenizer")

    def compute():
      parts = []
      for i, local in enumerate(input_pipeline.make_eval_iterator(ctx.config, records,
                                                                  ctx.data.tokenizer)):
        batch = sharding.global_batch({k: local[k] for k in HELDOUT_KEYS}, ctx.mesh)
        out = ctx.fns.heldout(params, batch, shuffled)
        parts.append({k: v[out["valid"]] for k, v in out.items()})
        if i == 0:  # a few examples as the host read them, for figures (`heldout_examples`)
          ctx.cache.get(params, ("heldout_examples", records, shuffled),
                        lambda: _first_examples(local, out))
      return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return ctx.cache.get(params, ("heldout", records, shuffled), compute)

  def heldout_examples(self, params, records: str, shuffled: bool = False
                       ) -> dict[str, np.ndarray]:
    """Up to `MAX_EXAMPLES` valid held-out examples of this host's first batch, with their
    frames and transcripts (`video`, `text_ids`, `text_mask`, `order`) and `sort_logits`."""
    self.heldout_outputs(params, records, shuffled)
    return self.ctx.cache.peek(params, ("heldout_examples", records, shuffled))


# Held-out examples `Evaluator.heldout_examples` keeps (for figures).
MAX_EXAMPLES = 16


def _first_examples(local: dict[str, np.ndarray], out: dict[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
  """This host's valid examples of one batch (host-local `local`, global `out`)."""
  n = len(local["valid"])
  # The global batch holds each host's slice in process order.
  rows = slice(jax.process_index() * n, (jax.process_index() + 1) * n)
  keep = np.asarray(local["valid"], bool)
  examples = {k: np.asarray(local[k])[keep][:MAX_EXAMPLES]
              for k in ("video", "text_ids", "text_mask", "order")}
  examples["sort_logits"] = np.asarray(out["sort_logits"][rows])[keep][:MAX_EXAMPLES]
  return examples


def check_positive(name: str, options: ml_collections.ConfigDict, *keys: str) -> None:
  """ConfigError unless every `options[key]` is > 0."""
  for key in keys:
    if not options[key] > 0:
      raise config_schema.ConfigError(f"evals.{name}.{key}={options[key]!r} must be positive")
