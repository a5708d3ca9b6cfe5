"""Test-wide settings: JAX's persistent compilation cache (compilation dominates on CPU)."""

from __future__ import annotations

import os

import jax

jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get("JAX_COMPILATION_CACHE_DIR")
  or os.path.join(os.path.expanduser("~"), ".cache", "mrcom_jax", "jax_cache"),
)
# Programs that compile in under 1 s are not worth a cache entry; fewer entries also mean fewer
# calls of `executable.serialize()`, where CI once crashed (SIGSEGV in jaxlib 0.12.0.1, not
# reproduced here).
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
