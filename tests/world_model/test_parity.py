"""jit / no-jit parity, and a mixed-domain batch against single-domain batches.

Equality as PROTOCOL.md defines it: within 1e-5 relative for parameters and values.
"""

from __future__ import annotations

import jax
import numpy as np

from mrcom_jax.envs import specs
from mrcom_jax.world_model import losses


def _rows(batch, idx):
  idx = np.asarray(idx)
  return jax.tree.map(lambda x: x[idx], batch)


def test_jit_and_no_jit_agree(world_model, state, batch, loss_fn):
  small = _rows(batch, [0, 3, 4])  # three domains; row 4 has empty context slots
  small = small.replace(
    obs=small.obs[:, :11], action=small.action[:, :11], reward=small.reward[:, :11],
    first=small.first[:, :11], valid=small.valid[:, :11],
  )  # fmt: skip
  key = jax.random.key(11)
  args = (state.variables, state.values, state.target, small, key)
  _, jitted = jax.jit(losses.make_loss(world_model))(*args)
  with jax.disable_jit():
    _, eager = losses.make_loss(world_model)(*args)
  assert set(jitted) == set(eager)
  for name in jitted:
    np.testing.assert_allclose(eager[name], jitted[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_mixed_batch_equals_single_domain_batches(state, batch, loss_fn):
  """Per-domain mean losses of one mixed batch equal those of single-domain batches.

  Each single-domain batch holds its domain's rows, with the same per-row keys (so the same
  noise), padded to the same batch size by rows with no valid step.
  """
  keys = jax.random.split(jax.random.key(4), batch.batch_size)
  _, mixed = loss_fn(state.variables, state.values, state.target, batch, keys)
  domain = np.asarray(batch.domain)
  for d, name in enumerate(specs.DOMAIN_NAMES):
    # The domain's rows, padded to the batch size with copies that hold no transition.
    rows = np.nonzero(domain == d)[0]
    idx = np.concatenate([rows, np.full(batch.batch_size - len(rows), rows[0])])
    single_batch = _rows(batch, idx)
    single_batch = single_batch.replace(valid=single_batch.valid.at[len(rows) :].set(False))
    _, single = loss_fn(state.variables, state.values, state.target, single_batch, keys[idx])
    for term in ("kl_z", "kl_u", "recon", "reward", "meta_state", "meta_value", "td"):
      np.testing.assert_allclose(
        single[term], mixed[f"{term}/{name}"], rtol=1e-5, atol=1e-6, err_msg=f"{term}/{name}"
      )
    np.testing.assert_allclose(single[f"recon/{name}"], single["recon"], rtol=1e-6)
    for other in set(specs.DOMAIN_NAMES) - {name}:
      assert float(single[f"recon/{other}"]) == 0.0
