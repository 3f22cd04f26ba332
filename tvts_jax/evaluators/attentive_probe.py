"""The attentive probe: a small cross-attention pooler trained on the frozen encoder's tokens.

The frozen-evaluation protocol of V-JEPA, VideoPrism and InternVideo2: instead of one linear
layer on the CLS token, a learned query attends over every output token of the frozen video
tower (read TSN-style like the linear probe, every patch kept), and a linear classifier reads
the pooled vector:

    q = query                                    [1, D], learned
    x = q + CrossAttention(q, LayerNorm(tokens))  num_heads heads, keys/values from all tokens
    x = x + Mlp(LayerNorm(x))                     hidden 4 D, exact GELU
    logits = Linear(LayerNorm(x))                 [num_classes]

It is trained with AdamW (cosine decay, `lr`, `weight_decay`) on shuffled mini-batches of the
train split for `steps` steps, then scored on the test split (top-1 / top-5). A linear probe
can only use what the CLS token already holds; this probe can read motion spread over the
patch tokens, so the two together say where the representation keeps it.

The train split's tokens are kept in host memory when they fit in `max_cache_gb`; otherwise
every step's batch is encoded again from the records, in record order.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tvts_jax import config_schema, sharding
from tvts_jax.evaluators import common
from tvts_jax.evaluators.probe import topk_accuracy
from tvts_jax.models import layers


class AttentivePooler(nnx.Module):
  """A learned query cross-attending over frozen tokens, then a linear classifier."""

  def __init__(self, width: int, num_heads: int, num_classes: int, *, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
    f32 = jnp.float32
    self.num_heads = num_heads
    self.query = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), (1, 1, width), f32))
    self.norm = layers.layer_norm(width, 1e-6, f32, rngs)
    self.q = layers.linear(width, width, f32, rngs)
    self.kv = layers.linear(width, 2 * width, f32, rngs)
    self.proj = layers.linear(width, width, f32, rngs)
    self.mlp_norm = layers.layer_norm(width, 1e-6, f32, rngs)
    self.mlp = layers.Mlp(width, 4 * width, dtype=f32, rngs=rngs)
    self.head_norm = layers.layer_norm(width, 1e-6, f32, rngs)
    self.head = layers.linear(width, num_classes, f32, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, N, D] tokens -> [B, num_classes] logits."""
    b, n, d = tokens.shape
    h = self.num_heads
    x = self.norm(tokens.astype(jnp.float32))
    query = jnp.broadcast_to(self.query[...], (b, 1, d))
    q = self.q(query).reshape(b, 1, h, d // h)
    kv = self.kv(x).reshape(b, n, 2, h, d // h)
    attended = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1])
    x = query + self.proj(attended.reshape(b, 1, d))
    x = x + self.mlp(self.mlp_norm(x))
    return self.head(self.head_norm(x[:, 0]))


def fit_attentive_probe(batches: Iterator[tuple[np.ndarray, np.ndarray]], *, width: int,
                        num_heads: int, num_classes: int, steps: int, lr: float,
                        weight_decay: float, seed: int = 0):
  """Trains an `AttentivePooler` on (tokens [b, S, D], labels [b]) mini-batches.

  Returns:
    (predict, last_loss): `predict(tokens) -> logits` (numpy), and the mean loss of the last
    10 steps.
  """
  graphdef, params = nnx.split(AttentivePooler(width, num_heads, num_classes,
                                               rngs=nnx.Rngs(seed)))
  params = params.to_pure_dict()
  tx = optax.adamw(optax.cosine_decay_schedule(float(lr), int(steps)),
                   weight_decay=float(weight_decay))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, tokens, labels):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(int(steps)):
    x, y = next(batches)
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(x),
                                         jnp.asarray(y, jnp.int32))
    losses.append(loss)
  logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  predict = lambda x: np.asarray(logits(params, jnp.asarray(x)))
  return predict, float(np.mean(jax.device_get(losses[-10:])))


class AttentiveProbe(common.Evaluator):
  """Attentive probe on the frozen tokens of a labelled train and test split."""
  SUMMARY = ("top1", "chance_top1")
  OPTIONS = {
      "train_records": ("", "labelled records to train on; empty: the demo's train split"),
      "test_records": ("", "labelled records to test on; empty: the demo's eval split"),
      "max_examples": (0, "use only the first this many examples of each split (0: all)"),
      "steps": (500, "AdamW steps"),
      "batch_size": (64, "examples per step"),
      "lr": (1e-3, "peak learning rate (cosine decay to 0)"),
      "weight_decay": (0.05, "AdamW's decoupled weight decay"),
      "num_heads": (0, "cross-attention heads; 0: the video tower's"),
      "max_cache_gb": (4.0, "keep the train split's tokens in host memory up to this size"),
  }

  @classmethod
  def check(cls, name, options) -> None:
    common.check_positive(name, options, "steps", "batch_size", "lr")
    if options.weight_decay < 0 or options.num_heads < 0:
      raise config_schema.ConfigError(
          f"evals.{name}: weight_decay={options.weight_decay} and num_heads="
          f"{options.num_heads} must be >= 0")

  def _encoded(self, params, records: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens [b, S, D], labels [b]) of the valid examples of each batch of a labelled split."""
    for batch in self.labelled_batches(records, self.options.max_examples):
      valid = sharding.to_host(batch["valid"])
      yield (self.ctx.fns.video_tokens(params, batch)[valid],
             sharding.to_host(batch["label"])[valid])

  def _train_batches(self, params, records: str, rng: np.random.Generator
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (tokens, labels) mini-batches of the train split."""
    o = self.options
    size = int(o.batch_size)
    tokens, labels, nbytes = [], [], 0
    for x, y in self._encoded(params, records):
      tokens.append(x)
      labels.append(y)
      nbytes += x.nbytes
      if nbytes > o.max_cache_gb * 2**30:
        break
    else:  # all of it fits: shuffled mini-batches of the kept tokens
      x, y = np.concatenate(tokens), np.concatenate(labels)
      del tokens, labels
      # Kept for this round: the linear probe reads its CLS features from them.
      self.ctx.cache.get(params, ("tokens", records, int(o.max_examples)), lambda: (x, y))
      while True:
        order = rng.permutation(len(x))
        for start in range(0, max(len(x) - size, 0) + 1, size):
          index = order[start:start + size]
          yield x[index], y[index]
    del tokens, labels
    while True:  # too large to keep: encoded again at every pass, in record order
      yield from self._encoded(params, records)

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    from tvts_jax import labelled  # pylint: disable=g-import-not-at-top
    o, data, config = self.options, self.ctx.data, self.ctx.config
    train = self.records("train_records", data.labelled_train)
    test = self.records("test_records", data.labelled_test)
    test_x, test_y = self.ctx.cache.get(
        params, ("tokens", test, int(o.max_examples)),
        lambda: tuple(np.concatenate(a) for a in zip(*self._encoded(params, test))))
    num_classes = 1 + int(max(
        labelled.labelled_example_labels(train, max_examples=o.max_examples).max(),
        test_y.max()))
    width = test_x.shape[-1]
    heads = int(o.num_heads) or int(config.model.video.num_heads)
    if width % heads:
      raise config_schema.ConfigError(f"evals.{self.name}.num_heads={heads} does not divide "
                                      f"the width of the video tower's tokens ({width})")
    batches = self._train_batches(params, train, np.random.default_rng(int(config.seed)))
    predict, train_loss = fit_attentive_probe(
        batches, width=width, num_heads=heads, num_classes=num_classes, steps=o.steps,
        lr=o.lr, weight_decay=o.weight_decay, seed=int(config.seed))
    size = int(o.batch_size)
    logits = np.concatenate([predict(test_x[i:i + size]) for i in range(0, len(test_x), size)])
    counts = np.bincount(test_y, minlength=num_classes)
    yield "top1", topk_accuracy(logits, test_y, 1)
    yield "top5", topk_accuracy(logits, test_y, 5)
    yield "train_loss", train_loss
    yield "num_test", float(len(test_y))
    yield "num_classes", float(num_classes)
    yield "chance_top1", float(counts.max() / len(test_y))
