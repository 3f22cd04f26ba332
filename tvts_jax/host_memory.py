"""Host allocator tuning for CPU-only training processes (glibc), opt-out by flag.

XLA:CPU mallocs a step's temporaries and frees them after the step. glibc serves a block above
32 MiB (and, in a worker thread's own arena, any block above 64 MiB) with fresh mmap'ed pages,
so every step page-faults its whole working set in again. One arena that never mmaps and never
trims keeps the pages for reuse. What that saves depends on the machine and its load
(docs/performance.md).

Nothing here runs on import: the entry points (`main.py`, `python -m tvts_jax.perf`) call
`configure(FLAGS.host_malloc)` before JAX creates its CPU client, since the setting only reaches
the threads that allocate after it. A library user who wants it calls it the same way, first.
Costs: the process keeps its peak host memory, and compiling is slower (the compiler's threads
share one arena).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import pkgutil

import jax

MODES = ("auto", "on", "off")


def keep_host_memory_mapped() -> bool:
  """Stops glibc from handing large freed blocks back to the OS (see the module docstring).

  Returns:
    Whether the allocator was reconfigured (False without glibc's mallopt).
  """
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
  # A trim threshold of -1 is SIZE_MAX inside glibc: never trim.
  return all(mallopt(option, value) == 1 for option, value in
             ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1)))


def cpu_only_process() -> bool:
  """Whether JAX can only run on the CPU here, decided without starting a backend."""
  if jax.config.jax_platforms:  # JAX_PLATFORMS
    return set(jax.config.jax_platforms.split(",")) == {"cpu"}
  # Otherwise JAX picks an accelerator when its plugin is installed (GPU plugins live in the
  # jax_plugins namespace or register an entry point; TPUs come with libtpu).
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return True
  return not any(pkgutil.iter_modules(jax_plugins.__path__))


def configure(mode: str = "auto") -> bool:
  """Applies the tuning: 'on', 'off', or 'auto' (on only where JAX can only use the CPU).

  On accelerators the step's buffers live in device memory, and many input threads sharing one
  malloc arena could slow them down, so 'auto' leaves GPU and TPU hosts alone.

  Returns:
    Whether the allocator was reconfigured.
  """
  if mode not in MODES:
    raise ValueError(f"host_malloc must be one of {MODES}, got {mode!r}")
  if mode == "off" or (mode == "auto" and not cpu_only_process()):
    return False
  return keep_host_memory_mapped()
