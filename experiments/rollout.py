"""Simulates randomised scenarios of every domain with random actions and summarises them.

  python -m experiments.rollout --config=experiments/configs/rollout.py:smoke --workdir=/tmp/rollout

Writes `<workdir>/summary.json` (per domain: scenarios, returns, speeds, divergence count,
steps/s; `_meta` with the simulation backend resolved, `env_backend`), `<workdir>/config.json`
and `<workdir>/rollout.png` (one scenario per domain). Override any field on the command line,
e.g. `--config.num_envs=16 --config.obs_fn=mask_random --config.env.backend=mjx`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from experiments import cli
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import morphology, scenarios, specs

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/rollout.py", "Rollout config file (preset after ':')."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/rollout", "Where the summary and plot are written.")


def validate(c) -> None:
  """Raises ValueError naming the field, before anything is compiled."""
  for d in c.domains:
    specs.get_domain(d)
  if c.num_envs < 1:
    raise ValueError(f"config.num_envs={c.num_envs} must be ≥ 1")
  if c.steps < 1 or c.chunk < 1:
    raise ValueError(f"config.steps={c.steps} and config.chunk={c.chunk} must be ≥ 1")
  scenarios.get_distribution(c.setting, c.split)
  from mrcom_jax.envs import obs_functions

  obs_functions.obs_fn_id(c.obs_fn)
  morphology.validate(c.domains[0], 1.0, 1.0, c.mass_rule)
  if c.env.backend not in env_lib.BACKENDS:
    raise ValueError(f"config.env.backend={c.env.backend!r} must be one of {env_lib.BACKENDS}")


def make_chunk(env, params, chunk: int):
  """A jitted scan of `chunk` random-action control steps, recording per-step summaries."""

  @jax.jit
  def run(state, key):
    def body(s, k):
      a = jax.random.uniform(k, (s.reward.shape[0], env.domain.act_dim), minval=-1.0, maxval=1.0)
      s = env.step(params, s, a)
      return s, (s.reward, s.speed, s.height, s.first, s.diverged)

    return jax.lax.scan(body, state, jax.random.split(key, chunk))

  return run


def simulate(c, domain: str, key, progress) -> dict:
  """Runs one domain's batch; returns its summary and per-step traces."""
  env = env_lib.make_env(domain, mass_rule=c.mass_rule, backend=c.env.backend)
  rng = np.random.default_rng(c.seed + specs.get_domain(domain).id)
  members = scenarios.get_distribution(c.setting, c.split).sample(rng, domain, c.num_envs)
  params = env.make_params(members, obs_fn=c.obs_fn, seed=c.seed)
  key_reset, key_run = jax.random.split(key)
  t0 = time.perf_counter()
  # `initial` marks every member `last`, so the first scanned step performs the reset: the
  # program holds one env step, compiled once.
  state = jax.jit(env.initial)(params, key_reset)
  run = make_chunk(env, params, c.chunk)
  traces, compiled_at = [], None
  for i, k in enumerate(jax.random.split(key_run, -(-c.steps // c.chunk))):
    state, out = run(state, k)
    traces.append(jax.device_get(out))
    if compiled_at is None:
      compiled_at = time.perf_counter()
    progress.update(c.chunk)
    progress.set_postfix(domain=domain, chunk=i)
  elapsed = time.perf_counter() - compiled_at
  reward, speed, height, first, diverged = (np.concatenate(x)[: c.steps] for x in zip(*traces))
  timed_steps = max(len(traces) - 1, 1) * c.chunk
  return {
    "scenarios": [vars(s) for s in members],
    "return": reward.sum(axis=0).tolist(),
    "mean_speed": speed.mean(axis=0).tolist(),
    "episodes_started": int(first.sum()),
    "divergences": int(diverged.sum()),
    "compile_and_first_chunk_s": compiled_at - t0,
    "env_steps_per_s": timed_steps * c.num_envs / elapsed if len(traces) > 1 else None,
    "_trace": {"reward": reward[:, 0], "speed": speed[:, 0], "height": height[:, 0]},
  }


def plot(results: dict, path: str, c) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(3, len(results), figsize=(4 * len(results), 7), squeeze=False)
  for j, (domain, r) in enumerate(results.items()):
    tr, sc = r["_trace"], r["scenarios"][0]
    title = (
      f"{domain}: α_len={sc['alpha_len']:.2f} α_size={sc['alpha_size']:.2f} β={sc['beta']:.2f}"
    )
    for i, name in enumerate(("speed", "height", "reward")):
      axes[i, j].plot(tr[name], lw=0.8)
      axes[i, j].set_ylabel(name)
    axes[0, j].set_title(title, fontsize=9)
    axes[-1, j].set_xlabel("control step")
  fig.suptitle(f"random actions, setting {c.setting}/{c.split}, obs_fn={c.obs_fn}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(c, workdir: str, verbose: bool = True) -> dict:
  """Simulates every domain of `c`, writes config.json, summary.json and rollout.png into
  `workdir`; returns the summary."""
  validate(c)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json(indent=1))
  results = {}
  total = len(c.domains) * -(-c.steps // c.chunk) * c.chunk
  with tqdm(total=total, unit="step", disable=not verbose) as bar:
    for i, domain in enumerate(c.domains):
      results[domain] = simulate(c, domain, jax.random.PRNGKey(c.seed * 1000 + i), bar)
  plot(results, os.path.join(workdir, "rollout.png"), c)
  summary = {d: {k: v for k, v in r.items() if not k.startswith("_")} for d, r in results.items()}
  summary["_meta"] = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),  # JAX's platform
    "env_backend": env_lib.resolve_backend(c.env.backend),
    "seed": c.seed,
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv) -> None:
  del argv
  c = _CONFIG.value
  cli.exit_on_bad_input(validate, c)  # one line, no traceback
  summary = run(c, _WORKDIR.value)
  for d, r in summary.items():
    if d.startswith("_"):
      continue
    sps = f"{r['env_steps_per_s']:.0f}" if r["env_steps_per_s"] else "n/a"
    print(
      f"{d:8s} mean return {np.mean(r['return']):8.2f}  mean speed {np.mean(r['mean_speed']):+.3f}"
      f"  divergences {r['divergences']}  env steps/s {sps}"
      f"  (compile+first chunk {r['compile_and_first_chunk_s']:.1f} s)"
    )
  print(f"wrote {_WORKDIR.value}/summary.json and rollout.png")


if __name__ == "__main__":
  app.run(main)
