r"""tvts-jax entry point: train (default), evaluate or export.

    python main.py --workdir=/tmp/tvts                        # the demo, on the built-in data
    python main.py --config=configs/paper.py --workdir=DIR \
        --config.data.train_records='DIR/yt-train.tfrecord-*' --config.data.tokenizer=spm.model
    python main.py --multihost ...                           # TPU pods, Slurm, several GPU hosts

The same command runs on CPU, one GPU, a GPU cluster or a TPU pod: only `config.mesh` changes.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "demo.py"),
    "Config file; override keys with --config.KEY=VALUE.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics, config.json (local or gs://).",
                    required=True)
flags.DEFINE_enum("mode", "train", ["train"], "What to run.")
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() first (TPU pods, Slurm, multi-host GPU: "
                  "the coordinator comes from the environment).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # tf.data only: keep TensorFlow off the accelerators, which belong to JAX.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.multihost:
    jax.distributed.initialize()
  from tvts_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
  if FLAGS.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
