"""`python -m tvts_jax.benchmark`: the former name of `python -m tvts_jax.perf`, kept as an alias
(same flags, help and output). The code lives in `tvts_jax/perf/`."""

from __future__ import annotations

import runpy

if __name__ == "__main__":
  # As `python -m tvts_jax.perf`: its __main__ becomes the main module (absl's --help reads it).
  runpy.run_module("tvts_jax.perf", run_name="__main__", alter_sys=True)
