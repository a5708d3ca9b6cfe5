"""Config presets: paper values by default, the smoke sizes in tiny(), ablations as switches."""

from __future__ import annotations

import pytest

from mrcom_jax.world_model import config as config_lib


def test_paper_defaults():
  c = config_lib.get_config()
  assert (c.embed, c.context_len, c.num_heads, c.num_layers) == (128, 20, 3, 1)
  assert (c.stoch, c.deter, c.aux, c.hidden, c.mlp_layers) == (128, 128, 32, 256, 2)
  assert (c.lambda_ms, c.lambda_v, c.lambda_mv, c.discount) == (0.1, 1.0, 1.0, 0.99)
  assert (c.batch_size, c.seq_len, c.free_bits, c.min_std) == (32, 64, 1.0, 0.1)
  assert (c.model_opt.lr, c.model_opt.weight_decay, c.model_opt.clip_norm) == (1e-4, 1e-4, 100.0)
  spec = config_lib.resolve(c)
  assert spec.qkv == 129 and spec.feat == 288 and spec.hidden == (256, 256)


def test_tiny_sizes():
  c = config_lib.tiny()
  assert (c.embed, c.stoch, c.deter, c.aux, c.hidden) == (33, 16, 32, 8, 64)
  assert (c.context_len, c.seq_len, c.batch_size) == (8, 16, 6)
  assert config_lib.resolve(c).qkv == 33  # 3 heads × 11


@pytest.mark.parametrize("name", config_lib.ABLATIONS)
def test_ablation_switches_resolve_and_do_not_mutate(name):
  base = config_lib.tiny()
  before = base.to_dict()
  spec = config_lib.resolve(config_lib.with_ablation(base, name))
  assert base.to_dict() == before
  full = config_lib.resolve(base)
  changed = {
    f for f in ("deter", "use_context", "lambda_ms", "use_meta_state", "lambda_mv", "lambda_v")
    if getattr(spec, f) != getattr(full, f)
  }  # fmt: skip
  assert (
    changed
    == {
      "no_deterministic": {"deter"},
      "no_context": {"use_context"},
      "no_meta_state": {"lambda_ms", "use_meta_state"},
      "no_meta_value": {"lambda_mv", "lambda_v"},
    }[name]
  )


def test_invalid_values_are_rejected():
  with pytest.raises(ValueError, match="unknown ablation"):
    config_lib.with_ablation(config_lib.tiny(), "no_everything")
  c = config_lib.tiny()
  c.mv_mode = "other"
  with pytest.raises(ValueError, match="mv_mode"):
    config_lib.resolve(c)
