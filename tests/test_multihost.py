"""Two processes on this machine, launched the way the README launches hosts of a GPU cluster:

    python main.py --multihost --coordinator_address=HOST0:PORT --num_processes=2 \
        --process_id=I --config=configs/tiny.py --workdir=SHARED ...

Each process has 4 fake CPU devices (a global mesh of 8), reads its own slice of the record files
(files[i::2]) and feeds its half of every global batch. They train the tiny config, checkpoint
together into the shared workdir, and stop together at the same step when only one of them gets
a SIGTERM. The losses and the checkpoint match one process with 8 devices fed the same global
batches (each host's batch, concatenated in process order).
"""

import contextlib
import os
import signal

import jax
import numpy as np

import train_process
from configs import tiny
from data_pipelines import synthetic
from tvts_jax import checkpoint as ckpt_lib
from tvts_jax import input_pipeline, sharding, train

NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4
TIMEOUT = 600  # seconds; generous: the test machine may be shared
# The same program, but gradients are all-reduced across processes (gloo) rather than within one.
RTOL = 1e-5


def _overrides(data):
  """The config of both runs, as `--config.KEY=VALUE` flags and as a ConfigDict."""
  return {
      "data.train_records": data["train"],
      "data.tokenizer": data["tokenizer"],
      "total_steps": 1000,  # the run ends at the SIGTERM
      "log_every_steps": 1,
      "checkpoint_every_steps": 2,
      # The attention key bias has a true gradient of exactly zero (softmax is shift
      # invariant): its computed gradient is round-off, which Adam with a tiny eps turns into
      # +-lr updates that differ with the reduction order (here: across processes or within
      # one). A larger eps keeps those updates negligible; every real gradient still moves its
      # parameter (as in test_train.test_step_on_1_and_8_devices_agree).
      "optim.eps": 1e-4,
      "evals.sort.every_steps": 0,  # no evaluation: what is compared is training
  }


def test_two_processes_match_one_and_stop_together(tmp_path):
  data = synthetic.ensure_demo_data(tiny.get_config(), str(tmp_path / "data"), verbose=False)
  overrides = _overrides(data)
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  flags = ["--config=configs/tiny.py"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  workdir = str(tmp_path / "run")
  files = input_pipeline.list_files(data["train"])
  assert len(files) >= NUM_PROCESSES  # each host has its own files

  port = train_process.free_port()
  env = train_process.subprocess_env(DEVICES_PER_PROCESS, compile_cache=None)
  with contextlib.ExitStack() as running:  # kills what still runs if an assertion fails
    hosts = [running.enter_context(train_process.TrainProcess(
        ["--multihost", f"--coordinator_address=127.0.0.1:{port}",
         f"--num_processes={NUM_PROCESSES}", f"--process_id={i}", f"--workdir={workdir}"]
        + flags, env, name=f"process {i}")) for i in range(NUM_PROCESSES)]
    assert "2 process(es), 8 device(s)" in hosts[0].wait_for(r"JAX .* device\(s\)", TIMEOUT)[0]
    hosts[0].wait_for_step(3, TIMEOUT)
    hosts[1].send(signal.SIGTERM)  # one host only: the other must learn of it and stop too
    for host in hosts:
      assert host.wait(TIMEOUT) == 0, host.tail()

  stopped = hosts[0].logged_steps()[-1]
  for host in hosts:
    assert host.logged_steps() == list(range(1, stopped + 1))
    assert f"stopping at step {stopped} after a termination signal" in host.log()
  steps = sorted(int(e) for e in os.listdir(os.path.join(workdir, "checkpoints")))
  assert steps[-1] == stopped and all(s % 2 == 0 for s in steps[:-1]), steps
  losses = train_process.logged_losses(workdir, hosts[0].proc.pid)  # process 0 writes events

  # One process, all 8 devices, the two hosts' batches side by side.
  trainer = train.Trainer(config, sharding.make_mesh(config.mesh))
  streams = [input_pipeline.make_train_iterator(config, data["train"], data["tokenizer"],
                                                process_index=i, process_count=NUM_PROCESSES)
             for i in range(NUM_PROCESSES)]
  expected = {}
  for step in range(1, stopped + 1):
    parts = [next(s) for s in streams]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in train.MODEL_KEYS}
    expected[step] = float(trainer.step(batch)["loss"])
  train_process.assert_same_losses(losses, expected, range(1, stopped + 1), rtol=RTOL)

  # The checkpoint the two processes wrote together holds the single process's state.
  checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  restored = checkpointer.restore(stopped, trainer.abstract_state())
  checkpointer.close()
  assert int(restored["step"]) == stopped
  restored_leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(restored))
  for (path, got), want in zip(restored_leaves, jax.tree.leaves(jax.device_get(trainer.state))):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5,  # 1% of one update (lr 1e-3)
                               err_msg=jax.tree_util.keystr(path))
