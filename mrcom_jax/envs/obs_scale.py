"""Computes the per-dimension observation scale table σ_d shipped in `envs/data/`.

PROTOCOL.md: σ_d is the standard deviation of clean observations over 10 uniform-random episodes
at the default morphology, seed 0, per domain. Regenerate (and bump the version if it changes):

  python -m mrcom_jax.envs.obs_scale [--episodes 10] [--out mrcom_jax/envs/data/obs_scale_v1.json]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import obs_functions, scenarios, specs

VERSION = 1


def random_episode_obs(domain: str, episodes: int = 10, seed: int = 0, length: int = 1000):
  """[episodes·(length+1), d_o] clean observations of random episodes at the default morphology."""
  env = env_lib.make_env(domain)
  params = env.make_params([scenarios.Scenario(domain)] * episodes, seed=seed)
  key_reset, key_act = jax.random.split(jax.random.PRNGKey(seed))

  @jax.jit
  def rollout(state):
    def body(s, key):
      a = jax.random.uniform(key, (episodes, env.domain.act_dim), minval=-1.0, maxval=1.0)
      s = env.step(params, s, a)
      return s, s.obs_clean

    return jax.lax.scan(body, state, jax.random.split(key_act, length))[1]

  first = jax.jit(env.reset)(params, key_reset)
  obs = jnp.concatenate([first.obs_clean[None], rollout(first)])
  return np.asarray(obs).reshape(-1, env.domain.obs_dim)


def compute_table(episodes: int = 10, seed: int = 0, length: int = 1000) -> dict:
  """The versioned table: {'version', 'episodes', 'seed', 'sigma': {domain: [d_o] floats}}."""
  sigma = {}
  for d in specs.DOMAIN_NAMES:
    sigma[d] = [float(x) for x in random_episode_obs(d, episodes, seed, length).std(axis=0)]
  return {"version": VERSION, "episodes": episodes, "seed": seed, "length": length, "sigma": sigma}


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--episodes", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=obs_functions.OBS_SCALE_FILE)
  args = parser.parse_args()
  table = compute_table(args.episodes, args.seed)
  with open(args.out, "w") as f:
    json.dump(table, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
