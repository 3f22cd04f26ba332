"""The optimizer and learning-rate schedule, from `config.optim`.

Without `optim.param_groups`, one AdamW for every parameter, with the weight decay of
`optim.weight_decay` on matrices and kernels only (`decay_mask`).

With `optim.param_groups`, an ordered list of rules `(regex, lr_multiplier, weight_decay)`:
each parameter takes the first rule whose regex matches its path (`video/blocks/layers/3/
time_attn/qkv/kernel`: the list layout, whatever `model.scan_layers` is), and gets AdamW at
`lr_multiplier` x the schedule with that decoupled weight decay (on every parameter the rule
matches: a rule for norms and biases says 0 itself). A multiplier of 0 freezes: those
parameters keep no optimizer state, their gradient is not computed (the step stops it) and
they are passed through untouched. A rule that matches nothing, a parameter that no rule
matches, and a rule that would split a scanned stack's layers are `ConfigError`s when the
trainer starts, which logs how many parameters each rule took (`describe_groups`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
import optax

from tvts_jax import config_schema

# Parameters that never get weight decay: norms, biases, embeddings and the special tokens.
NO_DECAY = re.compile(r"(norm|bias|embed|pos_|cls|type_emb|scale)", re.IGNORECASE)


def make_schedule(config) -> optax.Schedule:
  """Learning rate per step.

  `step` (the reference): constant `lr`, times `decay_factor` after each of
  `decay_fractions` of `total_steps` (epochs 12 and 16 of 20 -> 0.6, 0.8). `cosine`: cosine
  decay to 0 over `total_steps`. Both after `warmup_steps` of linear warmup.
  """
  o, total = config.optim, config.total_steps
  warm = o.warmup_steps
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warm, max(total, warm + 1), 0.0)
  if o.schedule == "step":
    boundaries = {int(f * total): o.decay_factor for f in o.decay_fractions}
    main = optax.piecewise_constant_schedule(o.lr, boundaries)
  else:
    main = optax.constant_schedule(o.lr)
  if not warm:
    return main
  # The decay boundaries stay at their absolute steps, as in the reference's epochs.
  return lambda step: main(step) * jax.numpy.minimum(1.0, (step + 1) / warm)


def decay_mask(params):
  """True for the weights that get weight decay (matrices and kernels, no embeddings)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and not NO_DECAY.search(jax.tree_util.keystr(path)), params)


# ---------------------------------------------------------------------------------------------
# Parameter groups.


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", k)))


def _list_paths(path, leaf, scanned: bool) -> list[str]:
  """The list-layout path(s) of one leaf: one, or one per layer of a scanned stack."""
  parts = [_key(k) for k in path]
  if scanned and "layers" in parts:
    i = parts.index("layers")
    if i + 1 < len(parts) and not parts[i + 1].isdigit():
      return ["/".join(parts[:i + 1] + [str(n)] + parts[i + 1:])
              for n in range(np.shape(leaf)[0])]
  return ["/".join(parts)]


def _rule_of(rules, path: str) -> int | None:
  for i, rule in enumerate(rules):
    if re.search(rule[0], path):
      return i
  return None


def param_labels(config, params) -> Any:
  """The index (as a string) of the rule each parameter takes: the tree multi_transform reads.

  Raises:
    ConfigError: a parameter no rule matches, or a scanned stack whose layers differ.
  """
  rules = config.optim.param_groups
  scanned = bool(config.model.scan_layers)

  def label(path, leaf):
    paths = _list_paths(path, leaf, scanned)
    found = {_rule_of(rules, p) for p in paths}
    if None in found:
      missing = next(p for p in paths if _rule_of(rules, p) is None)
      raise config_schema.ConfigError(
          f"the parameter {missing} matches no rule of optim.param_groups; end the list with a "
          "catch-all rule ('', lr_multiplier, weight_decay)")
    if len(found) > 1:
      raise config_schema.ConfigError(
          f"optim.param_groups give the layers of {paths[0].rsplit('/layers/', 1)[0]} "
          f"different rules {sorted(found)}; with model.scan_layers=True a stack's layers "
          "share one: set model.scan_layers=False")
    return str(found.pop())

  return jax.tree_util.tree_map_with_path(label, params)


def frozen_mask(config, params) -> Any:
  """True for the parameters a rule with multiplier 0 freezes (all False without groups)."""
  rules = config.optim.param_groups
  if not rules:
    return jax.tree.map(lambda _: False, params)
  return jax.tree.map(lambda label: float(rules[int(label)][1]) == 0.0,
                      param_labels(config, params))


def describe_groups(config, params) -> list[str]:
  """One line per rule: its regex, multiplier, weight decay and what it took.

  Raises:
    ConfigError: a rule that matches no parameter (or is shadowed by earlier rules).
  """
  rules = config.optim.param_groups
  labels = param_labels(config, params)
  counts = [[0, 0] for _ in rules]
  for label, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
    counts[int(label)][0] += 1
    counts[int(label)][1] += int(np.prod(np.shape(leaf)))
  lines = []
  for (regex, mult, wd), (arrays, size) in zip(rules, counts):
    if not arrays:
      raise config_schema.ConfigError(
          f"the rule {regex!r} of optim.param_groups matches no parameter (or only ones an "
          "earlier rule took): fix its regex or remove it")
    what = "frozen" if float(mult) == 0 else f"lr x{float(mult):g}, weight decay {float(wd):g}"
    lines.append(f"{regex!r}: {arrays} arrays, {size / 1e6:.2f}M parameters, {what}")
  return lines


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with the schedule, optional global-norm clipping, and the decay mask or the groups."""
  o = config.optim
  schedule = make_schedule(config)
  if o.param_groups:
    transforms = {}
    for i, (_, mult, wd) in enumerate(o.param_groups):
      mult = float(mult)
      transforms[str(i)] = (
          optax.set_to_zero() if mult == 0 else
          optax.adamw(lambda step, m=mult: m * schedule(step), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=float(wd)))
    tx = optax.multi_transform(transforms, lambda params: param_labels(config, params))
  else:
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=decay_mask)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx
