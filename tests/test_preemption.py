"""Preemption, crashes and numerical faults, with real processes and real signals.

`python main.py` runs in a child process on the tiny config; the test sends SIGTERM (what a TPU
preemption or a Slurm requeue sends) or SIGKILL (a crash, the OOM killer), restarts the same
command and compares every loss of the restarted run with an uninterrupted run of the same config
and seed: resume is exact, because the train state is restored whole and the input pipeline's
position is a function of the step.
"""

import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_process
from configs import tiny
from data_pipelines import synthetic
from tvts_jax import checkpoint as ckpt_lib
from tvts_jax import train

TOTAL_STEPS = 20  # of the reference run and of every restarted run
TIMEOUT = 600  # seconds for one child; generous: the test machine may be shared
# The same executable on the same inputs: only float32 round-off separates two runs, if that.
RTOL = 1e-6


class Runs:
  """Builds the command lines of the children; all share the demo data and a compile cache."""

  def __init__(self, root, data, compile_cache):
    self.root, self.data = root, data
    self.env = train_process.subprocess_env(8, compile_cache)
    self.flags = [
        "--config=configs/tiny.py",
        f"--config.data.train_records={data['train']}",
        f"--config.data.tokenizer={data['tokenizer']}",
        "--config.log_every_steps=1",  # every step's loss, not a mean over a window
        # A decay schedule depends on total_steps, which differs between the interrupted
        # runs (left to run until a signal) and the reference.
        "--config.optim.schedule=constant",
        "--config.evals.sort.every_steps=0",  # no evaluation: what is tested is training
    ]

  def start(self, name, total_steps, checkpoint_every_steps, workdir=None):
    """Starts a child in `workdir` (default: a new one named `name`); returns it and its workdir."""
    workdir = workdir or str(self.root / name)
    args = self.flags + [f"--workdir={workdir}", f"--config.total_steps={total_steps}",
                         f"--config.checkpoint_every_steps={checkpoint_every_steps}"]
    return train_process.TrainProcess(args, self.env, name=name), workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("preemption")
  data = synthetic.ensure_demo_data(tiny.get_config(), str(root / "data"), verbose=False)
  return Runs(root, data, str(tmp_path_factory.getbasetemp() / "jax_compile_cache"))


@pytest.fixture(scope="module")
def reference(runs):
  """{step: loss} of an uninterrupted run of TOTAL_STEPS steps."""
  proc, workdir = runs.start("reference", TOTAL_STEPS, TOTAL_STEPS)
  with proc:
    assert proc.wait(TIMEOUT) == 0, proc.tail()
  losses = train_process.logged_losses(workdir, proc.proc.pid)
  assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
  return losses


def _checkpoint_dir_entries(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _finish_and_compare(runs, name, workdir, restored_step, reference):
  """Restarts the run in `workdir` to TOTAL_STEPS; from the restored step on, its losses are the
  reference's."""
  proc, _ = runs.start(name, TOTAL_STEPS, TOTAL_STEPS, workdir=workdir)
  with proc:
    assert proc.wait(TIMEOUT) == 0, proc.tail()
  assert f"resuming from step {restored_step} " in proc.log(), proc.tail()
  resumed = train_process.logged_losses(workdir, proc.proc.pid)
  assert sorted(resumed) == list(range(restored_step + 1, TOTAL_STEPS + 1))
  train_process.assert_same_losses(resumed, reference, resumed, rtol=RTOL)


def test_sigterm_saves_the_current_step_exits_cleanly_and_resume_is_exact(runs, reference):
  # No periodic checkpoint (every 1000 steps): the only one is the one SIGTERM asks for.
  proc, workdir = runs.start("sigterm", 1000, 1000)
  with proc:
    proc.wait_for_step(3, TIMEOUT)
    proc.send(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0, proc.tail()
  stopped = proc.logged_steps()[-1]
  assert f"stopping at step {stopped} after a termination signal" in proc.log()
  assert 3 <= stopped < TOTAL_STEPS, "the run went too far before the signal to compare"
  assert _checkpoint_dir_entries(workdir) == [str(stopped)]
  # Up to the signal, the interrupted run is the reference run (a constant schedule).
  before = train_process.logged_losses(workdir, proc.proc.pid)
  train_process.assert_same_losses(before, reference, range(1, stopped + 1), rtol=RTOL)

  _finish_and_compare(runs, "sigterm-restart", workdir, stopped, reference)


def test_sigkill_loses_only_the_steps_since_the_last_save_and_resume_is_exact(runs, reference):
  every = 4
  proc, workdir = runs.start("sigkill", 1000, every)
  with proc:
    # Logged once the save of step 8 has started: a save first waits for the previous one, so
    # step 4 is complete; step 8 is most likely still being written when the kill lands.
    proc.wait_for(r"checkpoint: saving step 8 ", TIMEOUT)
    proc.send(signal.SIGKILL)
    assert proc.wait(TIMEOUT) == -signal.SIGKILL
  entries = _checkpoint_dir_entries(workdir)
  complete = [int(e) for e in entries if e.isdigit()]
  # Step 8 is complete or absent, never there in part: an unfinished save has only a
  # temporary name, which orbax neither lists nor restores.
  assert complete in ([4], [4, 8]), entries
  assert all(e.isdigit() or ".orbax-checkpoint-tmp" in e for e in entries), entries
  restored = complete[-1]
  assert proc.logged_steps()[-1] - restored < 2 * every

  _finish_and_compare(runs, "sigkill-restart", workdir, restored, reference)
  # The restart cleaned up what the killed save left behind.
  assert all(e.isdigit() for e in _checkpoint_dir_entries(workdir))


def test_checkpoint_being_written_is_never_the_latest(tmp_path):
  """What a process killed in the middle of writing step 5 leaves behind: orbax writes into
  `5.orbax-checkpoint-tmp` and renames it to `5` only when complete (here, a copy of step 3 with
  its data removed: a save cut short)."""
  state = {"w": jnp.arange(8, dtype=jnp.float32), "step": jnp.array(3, jnp.int32)}
  saver = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  saver.save(3, state)
  saver.close()
  directory = tmp_path / "checkpoints"
  partial = directory / "5.orbax-checkpoint-tmp"
  shutil.copytree(directory / "3", partial)
  for path in sorted(partial.rglob("*"), reverse=True):
    if path.is_file() and path.name != "_CHECKPOINT_METADATA":
      path.unlink()

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  assert checkpointer.latest_step() == 3
  restored = checkpointer.restore(3, abstract)
  np.testing.assert_array_equal(restored["w"], state["w"])
  # The next save of step 5 is not disturbed by the leftover.
  checkpointer.save(5, dict(state, w=state["w"] + 1))
  checkpointer.close()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  assert checkpointer.latest_step() == 5
  np.testing.assert_array_equal(checkpointer.restore(5, abstract)["w"], state["w"] + 1)
  checkpointer.close()
  assert sorted(os.listdir(directory)) == ["3", "5"]


def test_nonfinite_stop_names_the_step_and_writes_no_checkpoint(runs, tmp_path):
  """nonfinite='stop': the first non-finite step ends the run before anything is saved (the
  'skip' policy is tested in test_train.py: the update is not applied, so no NaN reaches the
  parameters or a checkpoint)."""
  config = tiny.get_config()
  config.temperature = 0.0  # cosine / 0: infinite logits, a NaN loss at the first step
  config.nonfinite = "stop"
  config.total_steps = 3
  config.checkpoint_every_steps = 1  # a save would follow every step, were the run to go on
  config.data.train_records = runs.data["train"]
  config.data.tokenizer = runs.data["tokenizer"]
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 1 "):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path / "checkpoints")
