"""Imagination's sliding context window (METHOD.md Eq. 4, last bullets; Algorithm 2, step 3).

`program.imagine` is the rollout loop of every adaptation round: the window must slide with the
re-perturbed decoded observation, the one the policy is given, not the decoded mean. Tested on
the world-model tests' tiny model with a normaliser far from the identity (one small jitted
scan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mrcom_jax.adaptation import program as program_lib
from mrcom_jax.envs import obs_functions, specs
from mrcom_jax.world_model import normalizer as normalizer_lib
from tests.world_model.conftest import world_model_for

H = 4  # imagined steps (< k = 8, so the window keeps all of them)


def test_imagined_window_tokens_are_the_policy_inputs():
  wm = world_model_for("")
  rng = np.random.default_rng(0)
  shape = (specs.NUM_DOMAINS, specs.OBS_PAD)
  norm = normalizer_lib.Normalizer(
    jnp.asarray(rng.normal(size=shape), jnp.float32),
    jnp.asarray(rng.uniform(0.2, 3.0, size=shape), jnp.float32),
  )
  variables = {**jax.jit(wm.init)(jax.random.key(0)), "normalizer": norm}
  assert wm.spec.context_len >= H
  ids = [0, 1, 2, 0, 1, 2]
  domain = jnp.asarray(ids, jnp.int32)
  obs_mask = jnp.asarray(np.stack([specs.obs_mask(d) for d in ids]))
  act_mask = jnp.asarray(np.stack([specs.act_mask(d) for d in ids]))
  seed_key = jax.random.PRNGKey(1)

  def run(obs_fn, key):
    ws = wm.initial(domain, obs_mask, act_mask)
    o0 = jax.random.normal(jax.random.fold_in(key, 0), (6, specs.OBS_PAD)) * obs_mask
    ws = ws.replace(obs=jnp.where(obs_mask > 0, norm.normalize(o0, domain), 0.0),
                    valid=jnp.ones(6, bool))  # fmt: skip
    policy = lambda o, k: jax.random.uniform(k, (6, specs.ACT_PAD), minval=-1, maxval=1) * act_mask
    return program_lib.imagine(wm, variables, ws, o0, policy, obs_fn, seed_key, H, key)

  run = jax.jit(run)
  normalise = lambda o, ws: np.where(ws.obs_mask > 0, norm.normalize(o, domain), 0.0)
  # `none` from the same key: the same ô_0 and a_0, so its ô_1 is step 0's decoded mean itself
  _, (o_none, a_none, _, decoded) = jax.device_get(
    run(obs_functions.obs_fn_id("none"), jax.random.key(3))
  )
  for name in ("add_gaussian", "mask_random"):
    ws, (o, a, _, o_next) = jax.device_get(run(obs_functions.obs_fn_id(name), jax.random.key(3)))
    np.testing.assert_array_equal(o[1:], o_next[:-1])  # the policy acts on the perturbed ô
    # tokens −H..−1 of the window: ô_0 (the start) .. ô_{H−1}, each as the policy saw it
    assert ws.window.valid[:, -H:].all() and not ws.window.valid[:, :-H].any()
    for h in range(H):
      np.testing.assert_allclose(ws.window.obs[:, h - H], normalise(o[h], ws), atol=1e-5)
      np.testing.assert_array_equal(ws.window.action[:, h - H], a[h])
    np.testing.assert_allclose(ws.obs, normalise(o_next[-1], ws), atol=1e-5)  # pending token
    # the perturbation is real: a decoded mean would differ from every perturbed observation
    np.testing.assert_array_equal(o[0], o_none[0])
    np.testing.assert_array_equal(a[0], a_none[0])
    if name == "add_gaussian":  # ô_1 − decoded mean ~ N(0, (0.1·σ_d)²) on the suite's entries
      sigma = np.stack([specs.pad(obs_functions.obs_scale(specs.DOMAINS[d].name), specs.OBS_PAD)
                        for d in ids])  # fmt: skip
      suite = (ws.obs_mask > 0) & (sigma > 0)
      z = (o_next[0] - decoded[0]) / (obs_functions.GAUSSIAN_SCALE * np.where(suite, sigma, 1))
      z = z[suite]  # 2 · (15 + 24 + 17) = 112 draws: mean square 1 ± 0.13 (measured 0.91)
      assert z.size == 112 and 0.6 < np.mean(z**2) < 1.5 and abs(z.mean()) < 0.35, z
    if name == "mask_random":
      zeros = (o_next == 0) & (ws.obs_mask[None] > 0)  # [H, S, 27]
      assert zeros.sum(-1).min() >= 2
