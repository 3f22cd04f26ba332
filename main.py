r"""tvts-jax entry point: train (default), evaluate or export.

    python main.py --workdir=/tmp/tvts                        # the demo, on the built-in data
    python main.py --config=configs/paper.py --workdir=DIR \
        --config.data.train_records='DIR/yt-train.tfrecord-*' --config.data.tokenizer=spm.model
    python main.py --multihost ...                           # TPU pods, Slurm, several GPU hosts
    python main.py --mode=eval --workdir=DIR [--eval_random_init]   # probe, retrieval, sorting
    python main.py --mode=export --workdir=DIR --export_path=encoder.safetensors

The same command runs on CPU, one GPU, a GPU cluster or a TPU pod: only `config.mesh` changes.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))


def _check_replaced_keys(argv):
  """Names the config keys that were replaced by others (the config flag parses its overrides
  as soon as it is defined, so this runs first)."""
  from tvts_jax import config_schema  # pylint: disable=g-import-not-at-top
  for arg in argv[1:]:
    key = arg.split("=", 1)[0].removeprefix("--config.")
    for old, new in config_schema.REPLACED_KEYS.items():
      if arg.startswith("--config.") and (key == old or key.startswith(old + ".")):
        raise SystemExit(f"FATAL Flags parsing error: {arg}: config key {old!r} was replaced "
                         f"by {new}")


_check_replaced_keys(sys.argv)
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "demo.py"),
    "Config file; override keys with --config.KEY=VALUE.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics, config.json (local or gs://).",
                    required=True)
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"],
                  "train; eval: the evaluations of config.evals (tvts_jax/evaluate.py); "
                  "export: the latest checkpoint to --export_path (tvts_jax/export.py).")
flags.DEFINE_string("export_path", None,
                    "export: the file to write (.safetensors or .npz; FILE.json beside it).")
flags.DEFINE_bool("export_full", False,
                  "export: the whole model (text tower, sorter, projections), not only the "
                  "video encoder.")
flags.DEFINE_string("eval_params", "checkpoint",
                    "eval: 'checkpoint' (the workdir's latest), 'random' (a fresh init of the "
                    "config), or an export file.")
flags.DEFINE_bool("eval_random_init", False,
                  "eval: also evaluate a random init of the same config, the same way.")
flags.DEFINE_list("eval_names", None,
                  "eval: run only these evaluations of config.evals (default: all of them).")
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() first (TPU pods, Slurm, multi-host GPU: "
                  "the coordinator comes from the environment unless the flags below say).")
flags.DEFINE_string("coordinator_address", None,
                    "--multihost: HOST:PORT of process 0, where no launcher (TPU, Slurm) "
                    "provides it.")
flags.DEFINE_integer("num_processes", None, "--multihost: number of processes.")
flags.DEFINE_integer("process_id", None, "--multihost: this process, 0..num_processes-1.")
flags.DEFINE_enum("host_malloc", "auto", ["auto", "on", "off"],
                  "Keep freed host memory mapped (glibc) so that CPU steps do not page-fault "
                  "their buffers in again; auto: on in CPU-only processes "
                  "(tvts_jax/host_memory.py; its effect varies by machine, see README).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # tf.data only: keep TensorFlow off the accelerators, which belong to JAX.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top
  from tvts_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure(FLAGS.host_malloc)  # before JAX starts its CPU client
  if FLAGS.multihost:
    # Unset flags stay None: initialize() then takes them from the TPU or Slurm environment.
    jax.distributed.initialize(FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  elif FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need "
                         "--multihost")
  from tvts_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
  if FLAGS.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == "eval":
    from tvts_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(FLAGS.config, FLAGS.workdir, source=FLAGS.eval_params,
                      random_init=FLAGS.eval_random_init, names=FLAGS.eval_names)
  elif FLAGS.mode == "export":
    if not FLAGS.export_path:
      raise app.UsageError("--mode=export needs --export_path=FILE (.safetensors or .npz)")
    from tvts_jax import export  # pylint: disable=g-import-not-at-top
    export.export_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.export_path,
                             full=FLAGS.export_full)


if __name__ == "__main__":
  app.run(main)
