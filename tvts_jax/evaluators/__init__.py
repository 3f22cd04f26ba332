"""Evaluations, plugged in by name: one file per protocol, one registry, one way to run them.

`config.evals` is a dict of named evaluations. Each has a `type` (a key of `REGISTRY`), how
often it runs during training (`every_steps`; 0: only in `main.py --mode=eval`) and the options
of its type (`REGISTRY[type].OPTIONS`):

    c.evals = evaluators.standard(sort_every_steps=500)     # what the shipped configs run
    c.evals.ssv2_probe = evaluators.config("probe", train_records=..., test_records=...)

The training loop and `--mode=eval` build the same evaluators (`build`) and run them the same
way (`run`); results are keyed `<name>/<metric>`.

    type               file                    what
    sort               sort.py                 held-out transcript sorting (+ frame-shuffled control)
    probe              probe.py                linear probe on frozen CLS features
    attentive_probe    attentive_probe.py      cross-attention pooler on frozen tokens
    v2v_retrieval      retrieval.py            video-to-video retrieval by class
    t2v_retrieval      retrieval.py            text-to-video retrieval on held-out examples
    zero_shot_classification   zero_shot.py    classes named through a prompt, by similarity
    caption_retrieval  zero_shot.py            text-to-video / video-to-text with captions

A new protocol is one new file with an `Evaluator` subclass, and one line here.
"""

from __future__ import annotations

from typing import Any, Iterable

from absl import logging
import ml_collections
import numpy as np

from tvts_jax import config_schema
from tvts_jax.evaluators import attentive_probe, common, probe, retrieval, sort, zero_shot
from tvts_jax.evaluators.common import Context, EvalData, ModelFns, SkipEvaluation

__all__ = ["REGISTRY", "config", "check_config", "build", "run", "Context", "EvalData",
           "ModelFns", "SkipEvaluation"]

# `config.evals.<name>.type` -> the evaluator class.
REGISTRY: dict[str, type[common.Evaluator]] = {
    "sort": sort.SortEvaluator,
    "probe": probe.LinearProbe,
    "attentive_probe": attentive_probe.AttentiveProbe,
    "v2v_retrieval": retrieval.VideoToVideo,
    "t2v_retrieval": retrieval.TextToVideo,
    "zero_shot_classification": zero_shot.ZeroShotClassification,
    "caption_retrieval": zero_shot.CaptionRetrieval,
}
# Keys every evaluation has, besides its type's options.
COMMON_OPTIONS = {
    "type": ("", "the protocol: a key of tvts_jax.evaluators.REGISTRY"),
    "every_steps": (0, "run every this many training steps (0: only in --mode=eval)"),
}


def _class(kind: str, where: str) -> type[common.Evaluator]:
  if kind not in REGISTRY:
    raise config_schema.ConfigError(f"{where}={kind!r}; must be one of {tuple(REGISTRY)}")
  return REGISTRY[kind]


def config(kind: str, **overrides: Any) -> ml_collections.ConfigDict:
  """An evaluation's config: `kind`'s options at their defaults, then `overrides`."""
  cls = _class(kind, "evaluation type")
  options = {"type": kind, "every_steps": COMMON_OPTIONS["every_steps"][0],
             **{k: default for k, (default, _) in cls.OPTIONS.items()}}
  for key, value in overrides.items():
    if key not in options:
      raise config_schema.ConfigError(f"{kind} evaluations have no option {key!r}; they take "
                                      f"{sorted(options)}")
    options[key] = value
  return ml_collections.ConfigDict(options)


def standard(sort_every_steps: int = 0) -> ml_collections.ConfigDict:
  """The evaluations the shipped configs run: every protocol, under its own name.

  Held-out sorting (with the frame-shuffled control) every `sort_every_steps` training steps;
  the others in `--mode=eval` only.
  """
  return ml_collections.ConfigDict(dict(
      sort=config("sort", every_steps=sort_every_steps),
      t2v_retrieval=config("t2v_retrieval"),
      probe=config("probe"),
      attentive_probe=config("attentive_probe"),
      v2v_retrieval=config("v2v_retrieval"),
      zero_shot_classification=config("zero_shot_classification"),
      caption_retrieval=config("caption_retrieval"),
  ))


def reference_markdown() -> str:
  """The README's table of every evaluation type's options (defaults and meanings)."""
  rows = ["| type | option | default | meaning |", "|---|---|---|---|"]
  for key, (default, meaning) in COMMON_OPTIONS.items():
    rows.append(f"| every type | `{key}` | {config_schema.format_value(default)} | {meaning} |")
  for kind, cls in REGISTRY.items():
    for key, (default, meaning) in cls.OPTIONS.items():
      rows.append(f"| `{kind}` | `{key}` | {config_schema.format_value(default)} | {meaning} |")
  return "\n".join(rows)


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an unknown type, an unknown or bad option of `cfg.evals`."""
  for name, options in cfg.evals.items():
    if not isinstance(options, ml_collections.ConfigDict) or "type" not in options:
      raise config_schema.ConfigError(
          f"evals.{name} must be an evaluation config with a 'type' (evaluators.config(...)); "
          f"got {options!r}")
    cls = _class(options.type, f"evals.{name}.type")
    allowed = set(COMMON_OPTIONS) | set(cls.OPTIONS)
    for key in options.keys():
      if key not in allowed:
        close = [k for k in sorted(allowed) if k[:3] == key[:3]]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise config_schema.ConfigError(
            f"unknown config key 'evals.{name}.{key}'{hint}; {options.type} evaluations take "
            f"{sorted(allowed)}")
    missing = sorted(allowed - set(options.keys()))
    if missing:
      raise config_schema.ConfigError(f"evals.{name} lacks {missing}: build it with "
                                      f"evaluators.config({options.type!r}, ...)")
    if options.every_steps < 0:
      raise config_schema.ConfigError(f"evals.{name}.every_steps={options.every_steps} must "
                                      "be >= 0 (0: only in --mode=eval)")
    cls.check(name, options)


def build(ctx: Context, names: Iterable[str] | None = None,
          periodic: bool = False) -> dict[str, common.Evaluator]:
  """The evaluators of `ctx.config.evals`, by name.

  Args:
    ctx: the shared context (config, mesh, model functions, data defaults).
    names: only these evaluations (in this order); default all of them.
    periodic: only those that run during training (`every_steps > 0`).

  Returns:
    {name: evaluator}.
  """
  evals = ctx.config.evals
  names = list(evals.keys()) if names is None else list(names)
  unknown = [n for n in names if n not in evals]
  if unknown:
    raise config_schema.ConfigError(f"no evaluation named {unknown} in config.evals "
                                    f"({list(evals.keys())})")
  return {n: REGISTRY[evals[n].type](n, evals[n], ctx) for n in names
          if not periodic or evals[n].every_steps > 0}


def run(evaluators: dict[str, common.Evaluator], params: Any, *,
        log_prefix: str = "eval") -> dict[str, Any]:
  """Runs every evaluator on `params`.

  Returns:
    {'metrics': {'<name>/<metric>': float}, 'images': {'<name>/<image>': uint8 [H, W, 3]},
    'skipped': {name: reason}}.
  """
  metrics, images, skipped = {}, {}, {}
  for name, evaluator in evaluators.items():
    try:
      for key, value in evaluator.run(params):
        if isinstance(value, np.ndarray) and value.ndim == 3:
          images[f"{name}/{key}"] = value
        else:
          metrics[f"{name}/{key}"] = float(value)
    except SkipEvaluation as e:
      skipped[name] = str(e)
      logging.warning("%s: %s skipped: %s", log_prefix, name, e)
  return {"metrics": metrics, "images": images, "skipped": skipped}
