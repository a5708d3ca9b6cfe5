"""Adaptation throughput: real steps/s of one program adapting a batch of (scenario, seed) pairs.

  python -m benchmarks.adapt                          # CPU: smoke sizes, 3 domains × 1 × 2 seeds
  python -m benchmarks.adapt --size paper --scenarios 5 --seeds 5 --chunks 8   # a GPU (75 pairs)

On each simulation backend (`--backends`). Each real step of every pair includes everything
Algorithm 2 does per step: the env step of each domain's sub-batch, the stream write, the SAC
updates (`updates_per_step` of them, vmapped over the pairs) and, every 250 steps, a rollout
round (filtering and H-step imagination from `starts` start states per pair). A chunk is 250
steps, so every timed chunk holds one round. The world model and the behaviour experts are
freshly initialised (throughput does not depend on their values), so nothing needs
pretraining. Reported after compilation: ms per real step (all pairs at once), real steps/s
per pair and in all, SAC updates/s, compile seconds, peak memory, and the hours a 100k-step
adaptation takes at that rate. The issue's aim on one H200-class GPU: <= 9 ms per real step
for 75 pairs at paper size.
Writes benchmarks/results/adapt_<size>_<device>_<date>.json.
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import numpy as np

from benchmarks import common
from benchmarks.pretrain import _peak_memory
from mrcom_jax.adaptation import program as program_lib
from mrcom_jax.agents import sac as sac_lib
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import scenarios, specs
from mrcom_jax.world_model import config as wm_config
from mrcom_jax.world_model import model as model_lib

SIZES = {
  # PROTOCOL.md's smoke adaptation and METHOD.md's Algorithm 2 numbers.
  "smoke": dict(wm=wm_config.tiny, hidden=64, batch=64, updates=2, starts=256, ratio=0.5),
  "paper": dict(
    wm=wm_config.get_config, hidden=256, batch=256, updates=10, starts=4096, ratio=0.05
  ),
}
CHUNK = 250
BUDGET = 100_000  # real steps of one adaptation


def build(size: str, domains, scenarios_per_domain: int, seeds: int, rollouts: bool, backend: str):
  s = SIZES[size]
  wm_cfg = s["wm"]()
  n = scenarios_per_domain * seeds
  spec = program_lib.AdaptSpec(
    domains=tuple((d, n) for d in domains), context_len=wm_cfg.context_len,
    real_steps=BUDGET, chunk=CHUNK, updates_per_step=s["updates"],
    sac=sac_lib.SACConfig(hidden=(s["hidden"],) * 2, actor_lr=1e-4, critic_lr=2e-4,
                          batch_size=s["batch"]),
    real_ratio=s["ratio"], model_rollouts=rollouts, rollout_every=CHUNK, rollout_start=CHUNK,
    rollout_starts=s["starts"], horizon=5, keep_rounds=5, prompt=True,
    behaviour_sac=sac_lib.SACConfig(hidden=(s["hidden"],) * 2),
  )  # fmt: skip
  world_model = model_lib.make_world_model(wm_cfg) if rollouts else None
  program = program_lib.make_program(spec, world_model, backend=backend)
  rng = np.random.default_rng(0)
  env_params, actors = [], []
  for env in program.envs:
    dist = scenarios.get_distribution("a", "train")
    members = [
      m for m in dist.sample(rng, env.domain.name, scenarios_per_domain) for _ in range(seeds)
    ]
    env_params.append(env.make_params(members))
    d = env.domain
    actors.append(
      sac_lib.init(spec.behaviour_sac, jax.random.PRNGKey(d.id), d.obs_dim, d.act_dim).actor
    )
  pairs = spec.num_pairs
  keys = np.stack([np.asarray(jax.random.PRNGKey(i)) for i in range(pairs)])
  variables = world_model.init(jax.random.PRNGKey(1)) if rollouts else None
  params = program.make_params(
    env_params, keys, [0] * pairs, variables, actors, random_steps=CHUNK, update_after=64
  )
  return program, params


def measure(program, params, chunks: int) -> dict:
  state = program.init(params)
  t0 = time.perf_counter()
  state, out = program.run(state, params, program_lib.AdaptMode.TRAIN)  # compiles; steps 1..250
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(chunks):
    t0 = time.perf_counter()
    state, out = program.run(state, params, program_lib.AdaptMode.TRAIN)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  spec = program.spec
  per_step = float(np.median(times)) / CHUNK
  pairs = spec.num_pairs
  return {
    "pairs": pairs,
    "domains": [d for d, _ in spec.domains],
    "rollouts": spec.model_rollouts,
    "timed_real_steps": chunks * CHUNK,
    "first_chunk_s_incl_compile": compile_s,
    "ms_per_real_step": 1000 * per_step,
    "real_steps_per_s_all_pairs": pairs / per_step,
    "real_steps_per_s_per_pair": 1 / per_step,
    "sac_updates_per_s": pairs * spec.updates_per_step / per_step,
    "hours_per_100k_steps": BUDGET * per_step / 3600,
    "chunk_seconds": times,
    **_peak_memory(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("--size", choices=sorted(SIZES), default="smoke")
  parser.add_argument("--domains", default="hopper,walker,cheetah")
  parser.add_argument("--scenarios", type=int, default=1, help="scenarios per domain")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--chunks", type=int, default=2, help="timed chunks of 250 real steps")
  parser.add_argument("--no_plain", action="store_true", help="skip the no-rollout comparison")
  parser.add_argument("--backends", default="mjx,mujoco", help="simulation backends")
  args = parser.parse_args()
  backends = args.backends.split(",")
  for b in backends:
    env_lib.resolve_backend(b)
  domains = tuple(args.domains.split(","))
  for d in domains:
    specs.get_domain(d)
  results = []
  for backend, rollouts in itertools.product(backends, (True,) if args.no_plain else (True, False)):
    program, params = build(args.size, domains, args.scenarios, args.seeds, rollouts, backend)
    r = measure(program, params, args.chunks)
    r["size"] = args.size
    r["env_backend"] = program.envs[0].backend
    print(
      f"{args.size} {backend} {'rollouts' if rollouts else 'plain SAC'}: {r['pairs']} pairs, "
      f"{r['ms_per_real_step']:.2f} ms per real step, {r['real_steps_per_s_all_pairs']:.0f} "
      f"real steps/s in all, {r['sac_updates_per_s']:.0f} SAC updates/s, first chunk "
      f"{r['first_chunk_s_incl_compile']:.0f} s, 100k steps in {r['hours_per_100k_steps']:.2f} h"
    )
    results.append(r)
  common.write(f"adapt_{args.size}", {"args": vars(args), "results": results})


if __name__ == "__main__":
  main()
