r"""`python -m tvts_jax.ablation`: what each half of the TVTS objective buys.

    python -m tvts_jax.ablation --workdir=DIR                      # configs/demo.py
    python -m tvts_jax.ablation --workdir=DIR --config=configs/tiny.py --config.total_steps=50
    python -m tvts_jax.ablation --workdir=DIR --arms=tvts,sort

Trains the same config on the same data, for the same steps with the same seed, three ways
(the arms; `--arms` picks some):

    tvts         the config as given (contrastive_weight * contrastive + sort_weight * sort)
    contrastive  sort_weight=0: the video-text contrastive loss alone
    sort         contrastive_weight=0: the transcript-sorting loss alone

Each arm is an ordinary training run in `DIR/<arm>` (`train.train_and_evaluate`, what
`main.py` runs), so running the command again resumes an interrupted arm from its checkpoint
and skips the finished ones; `python main.py --mode=eval --workdir=DIR/<arm>` with the same
config and the arm's override works on it as on any run. The built-in demo data is generated
once, into `DIR/data` (each arm's `demo_data` links there).

Then the final checkpoint of each arm and a random init of the config are evaluated
(`evaluate.evaluate`, i.e. `main.py --mode=eval --eval_random_init`) with the evaluations of
`config.evals` the table needs (linear probe, video-to-video and text-to-video retrieval,
held-out sorting with its frame-shuffled control); an arm whose results for its final step are
already in its `eval_results.json` is not evaluated again. Written:

    DIR/ablation.json      per row (random, and each arm): metrics, config overrides, steps
    DIR/ablation.png       a grouped bar chart, one group per metric
    DIR/sort_examples.png  the sort evaluator's figure of held-out examples, tvts arm

and the table is printed.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

# arm -> config overrides.
ARMS: dict[str, dict[str, float]] = {
    "tvts": {},
    "contrastive": {"sort_weight": 0.0},
    "sort": {"contrastive_weight": 0.0},
}
RANDOM = "random"
# The table's columns: (label, evaluation type, metric of that type).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("probe top-1", "probe", "top1"),
    ("probe chance", "probe", "chance_top1"),
    ("v2v R@1", "v2v_retrieval", "R@1"),
    ("t2v R@1", "t2v_retrieval", "R@1"),
    ("sort acc", "sort", "sort_acc"),
    ("shuffled sort acc", "sort", "shuffled_frames/sort_acc"),
    ("chance sort acc", "sort", "chance_sort_acc"),
)
RESULTS_FILE = "ablation.json"
CHART_FILE = "ablation.png"
EXAMPLES_FILE = "sort_examples.png"
DATA_DIR = "data"


def _say(message: str) -> None:
  print(f"ablation: {message}", flush=True)


def parse_arms(arms: Sequence[str] | str | None) -> list[str]:
  """The arms to run, in the order given; ValueError for an unknown, repeated or empty list."""
  if arms is None:
    return list(ARMS)
  if isinstance(arms, str):
    arms = arms.split(",")
  arms = [a.strip() for a in arms if a.strip()]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    raise ValueError(f"--arms: unknown arm(s) {unknown}; choose from {list(ARMS)} "
                     "(comma-separated)")
  if len(set(arms)) != len(arms):
    raise ValueError(f"--arms={','.join(arms)} names an arm twice")
  if not arms:
    raise ValueError(f"--arms is empty; choose from {list(ARMS)}")
  return arms


def arm_config(config: ml_collections.ConfigDict, arm: str) -> ml_collections.ConfigDict:
  """The config of one arm: `config` with the arm's overrides, validated."""
  from tvts_jax import config_schema  # pylint: disable=g-import-not-at-top
  c = copy.deepcopy(config)
  for key, value in ARMS[arm].items():
    c[key] = value
  try:
    config_schema.validate(c)
  except config_schema.ConfigError as e:
    raise config_schema.ConfigError(f"arm {arm!r} ({ARMS[arm] or 'the config as given'}): "
                                    f"{e}") from None
  return c


def eval_names(config: ml_collections.ConfigDict) -> list[str]:
  """The evaluations of `config.evals` the table reads: the first of each type it needs."""
  from tvts_jax import config_schema  # pylint: disable=g-import-not-at-top
  names = []
  for kind in dict.fromkeys(kind for _, kind, _ in COLUMNS):
    found = [n for n, e in config.evals.items() if e.type == kind]
    if found and found[0] not in names:
      names.append(found[0])
  if not names:
    raise config_schema.ConfigError(
        "config.evals has none of the evaluations the ablation reports "
        f"({sorted({kind for _, kind, _ in COLUMNS})}); take evaluators.standard()")
  return names


def _column_metrics(config, metrics: dict[str, float]) -> dict[str, float]:
  """{column label: value} of an evaluation's `<name>/<metric>` results (missing left out)."""
  out = {}
  for label, kind, metric in COLUMNS:
    names = [n for n, e in config.evals.items() if e.type == kind]
    if names and f"{names[0]}/{metric}" in metrics:
      out[label] = metrics[f"{names[0]}/{metric}"]
  return out


def share_demo_data(config: ml_collections.ConfigDict, workdir: str, arms: Sequence[str]
                    ) -> None:
  """Points each arm's `demo_data` at `workdir/data`, where the demo data is generated once.

  Only with the built-in data (empty `data.train_records`) and a local workdir (a link cannot
  be made on a remote file system; each arm then generates its own copy).
  """
  if config.data.train_records:
    return
  if "://" in workdir:
    _say(f"{workdir} is not local: each arm generates its own demo data")
    return
  target = os.path.join(workdir, DATA_DIR)
  os.makedirs(target, exist_ok=True)
  for arm in arms:
    link = os.path.join(workdir, arm, "demo_data")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.islink(link) or not os.path.exists(link):
      if os.path.islink(link) and os.path.realpath(link) == os.path.realpath(target):
        continue
      if os.path.islink(link):
        os.remove(link)
      os.symlink(os.path.join(os.pardir, DATA_DIR), link)
    # An arm trained before with its own demo_data folder keeps it.


def latest_step(workdir: str) -> int:
  """The workdir's latest checkpoint step (0: none)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tvts_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(os.path.join(workdir, "checkpoints")):
    return 0
  checkpointer = ckpt_lib.Checkpointer(workdir, 1, async_save=False)
  try:
    return checkpointer.latest_step() or 0
  finally:
    checkpointer.close()


def _json_equal(a: Any, b: Any) -> bool:
  norm = lambda x: json.loads(json.dumps(x, sort_keys=True, default=str))
  return norm(a) == norm(b)


def saved_results(config: ml_collections.ConfigDict, workdir: str, names: Sequence[str],
                  source: str, step: int | None) -> dict[str, Any] | None:
  """The entry of `source` in WORKDIR/eval_results.json if it holds what the ablation needs:
  every one of `names` evaluated (or skipped), at `step`, with today's options; else None."""
  from tvts_jax import evaluate  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, evaluate.RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  entry = saved.get("results", {}).get(source)
  if entry is None or entry.get("step") != step:
    return None
  evals = saved.get("evals", {})
  for name in names:
    if not _json_equal(evals.get(name), config.evals[name].to_dict()):
      return None
    if (name not in entry.get("skipped", {})
        and not any(k.startswith(name + "/") for k in entry["metrics"])):
      return None
  return entry


def sort_figure(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray | None:
  """The sort evaluator's figure of WORKDIR's latest checkpoint (None: no sort evaluation or
  its `images` is 0)."""
  from tvts_jax import evaluate, evaluators, sharding  # pylint: disable=g-import-not-at-top
  names = [n for n, e in config.evals.items() if e.type == "sort" and e.images]
  if not names:
    return None
  mesh = sharding.make_mesh(config.mesh)
  loaded = evaluate.load_source(config, workdir, "checkpoint", mesh)
  ctx = evaluators.Context(config, mesh, evaluators.ModelFns(loaded.config, mesh),
                           evaluate.eval_data(config, workdir))
  evaluator = evaluators.build(ctx, names[:1])[names[0]]
  return evaluator.figure(loaded.params, evaluator.records("records", ctx.data.heldout))


def save_png(image: np.ndarray, path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def format_table(rows: dict[str, dict[str, Any]]) -> str:
  """One row per model (random, the arms), one column per metric."""
  labels = [label for label, _, _ in COLUMNS]
  header = ["model", "steps"] + labels
  body = [[name, str(r["steps"])] + [f"{r['metrics'][c]:.4f}" if c in r["metrics"] else "-"
                                     for c in labels] for name, r in rows.items()]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def bar_chart(rows: dict[str, dict[str, Any]], path: str, title: str = "") -> None:
  """A grouped bar chart: one group per metric, one bar per model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  labels = [label for label, _, _ in COLUMNS
            if any(label in r["metrics"] for r in rows.values())]
  fig = Figure(figsize=(max(6.0, 1.5 * len(labels)), 4.0), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  width = 0.8 / max(len(rows), 1)
  x = np.arange(len(labels))
  for i, (name, r) in enumerate(rows.items()):
    values = [r["metrics"].get(label, np.nan) for label in labels]
    ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=name)
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
  ax.set_ylabel("value")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)


def run_ablation(config: ml_collections.ConfigDict, workdir: str,
                 arms: Sequence[str] | str | None = None) -> dict[str, Any]:
  """Trains and evaluates the arms, writes the JSON, the chart and the figure; prints the table.

  Returns:
    The JSON written to WORKDIR/ablation.json: {'rows': {'random' and each arm: {'metrics':
    {column: value}, 'all_metrics', 'overrides', 'steps', 'workdir', 'train_s', 'eval_s'}},
    'columns', 'eval_names', 'config'}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from tvts_jax import config_schema, evaluate, evaluators, train  # pylint: disable=g-import-not-at-top
  arms = parse_arms(arms)
  config_schema.validate(config)
  evaluators.check_config(config)
  configs = {arm: arm_config(config, arm) for arm in arms}  # every arm checked before any work
  names = eval_names(config)
  os.makedirs(workdir, exist_ok=True)
  share_demo_data(config, workdir, arms)
  total = int(config.total_steps)

  rows: dict[str, dict[str, Any]] = {}
  random_entry = None
  for i, arm in enumerate(arms):
    arm_dir, cfg = os.path.join(workdir, arm), configs[arm]
    where = f"[{i + 1}/{len(arms)}] {arm} ({ARMS[arm] or 'the config as given'})"
    start = latest_step(arm_dir)
    t0 = time.time()
    if start >= total:
      _say(f"{where}: trained (step {start}), not trained again")
    else:
      _say(f"{where}: training steps {start}..{total} in {arm_dir}")
      train.train_and_evaluate(cfg, arm_dir)
      _say(f"{where}: trained in {time.time() - t0:.0f} s")
    train_s = time.time() - t0
    step = latest_step(arm_dir)

    t0 = time.time()
    entry = saved_results(cfg, arm_dir, names, "checkpoint", step)
    if random_entry is None:
      random_entry = saved_results(cfg, arm_dir, names, "random_init", None)
    images: dict[str, dict[str, Any]] = {}
    if entry is None or random_entry is None and i == 0:
      with_random = random_entry is None and i == 0
      _say(f"{where}: evaluating step {step}" + (" and a random init" if with_random else "")
           + f" ({', '.join(names)})")
      results = evaluate.evaluate(cfg, arm_dir, random_init=with_random, names=names,
                                  images=images)
      entry = results["checkpoint"]
      if with_random:
        random_entry = results["random_init"]
    else:
      _say(f"{where}: evaluation of step {step} found in {arm_dir}/{evaluate.RESULTS_FILE}")
    rows[arm] = {"metrics": _column_metrics(cfg, entry["metrics"]),
                 "all_metrics": entry["metrics"], "skipped": entry.get("skipped", {}),
                 "overrides": dict(ARMS[arm]), "steps": step, "workdir": arm_dir,
                 "train_s": round(train_s, 1), "eval_s": round(time.time() - t0, 1)}

    if arm == "tvts" and jax.process_index() == 0:
      path = os.path.join(workdir, EXAMPLES_FILE)
      figure = next((v for k, v in images.get("checkpoint", {}).items()
                     if k.endswith("/examples")), None)
      if figure is None and not os.path.exists(path):
        figure = sort_figure(cfg, arm_dir)
      if figure is not None:
        save_png(figure, path)

  if random_entry is None:  # the first arm's results were cached, without the random init
    first = arms[0]
    _say(f"evaluating a random init ({', '.join(names)})")
    random_entry = evaluate.evaluate(configs[first], os.path.join(workdir, first),
                                     source="random", names=names)["random_init"]
  rows = {RANDOM: {"metrics": _column_metrics(config, random_entry["metrics"]),
                   "all_metrics": random_entry["metrics"],
                   "skipped": random_entry.get("skipped", {}), "overrides": {}, "steps": 0,
                   "source": random_entry["description"]}, **rows}

  out = {"rows": rows, "columns": [label for label, _, _ in COLUMNS], "eval_names": names,
         "arms": {arm: ARMS[arm] for arm in arms}, "config": json.loads(
             config.to_json_best_effort())}
  table = format_table(rows)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
      json.dump(out, f, indent=2, default=str)
    bar_chart(rows, os.path.join(workdir, CHART_FILE),
              title=f"{total} steps each, seed {config.seed}")
    print(table, flush=True)
    _say(f"wrote {os.path.join(workdir, RESULTS_FILE)}, {os.path.join(workdir, CHART_FILE)}"
         + (f", {os.path.join(workdir, EXAMPLES_FILE)}" if "tvts" in arms else ""))
  return out


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    arms = parse_arms(_FLAGS.arms)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # tf.data only: keep TensorFlow off the accelerators, which belong to JAX.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  from tvts_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure("auto")  # before JAX starts its CPU client
  run_ablation(_FLAGS.config, _FLAGS.workdir, arms)


_FLAGS = None


def _define_flags():
  global _FLAGS
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config_flags.DEFINE_config_file(
      "config", os.path.join(here, "configs", "demo.py"),
      "Config file; override keys with --config.KEY=VALUE.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the arms' runs (DIR/<arm>), the shared demo data "
                      "(DIR/data) and the results go.", required=True)
  flags.DEFINE_list("arms", list(ARMS), f"Arms to run, of {list(ARMS)}.")
  _FLAGS = flags.FLAGS


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  sys.exit(app.run(main))
