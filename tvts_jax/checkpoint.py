"""Checkpoints: orbax CheckpointManager, resume from the workdir, save on SIGTERM.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
checkpoint being written when the process dies is never picked up as the latest. Saves are
asynchronous: training goes on while the previous step's arrays are written.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written for a different model or optimizer."""


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'params/video/norm/scale/value': shape}: one naming for live trees and saved metadata
  (which stores tuples and attribute nodes as plain dicts)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in p): tuple(getattr(x, "shape", ())) for p, x in flat}


class Checkpointer:
  """Saves and restores the train state under `WORKDIR/checkpoints`."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(workdir, "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Named so that a fresh process can read the metadata before the first save.
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            # Leftovers of a save interrupted by a crash are removed, never read.
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` onto the shardings of `abstract_state` (ShapeDtypeStructs).

    Raises:
      CheckpointMismatchError: naming the first parameter whose path or shape differs.
    """
    self._check_compatible(step, abstract_state)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    saved = _flat_shapes(self._manager.item_metadata(step))
    wanted = _flat_shapes(abstract_state)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match this config: "
          f"missing {missing[:5]}, unexpected {extra[:5]} (a different model config?)")
    for path, shape in wanted.items():
      if saved[path] != shape:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory}: {path} has shape {saved[path]}, "
            f"this config builds {shape} (a different model config?)")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionFlag:
  """Set by SIGTERM (TPU preemption, Slurm requeue, `kill`); the loop saves and exits.

  The handler only sets a flag: saving inside a signal handler could interleave with a step.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self) -> "PreemptionFlag":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
