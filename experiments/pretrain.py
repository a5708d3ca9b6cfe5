"""Pretrains the multi-scenario world model (MrCoM) on behaviour data of every domain.

  python -m experiments.pretrain --config=experiments/configs/meta.py --workdir=runs/meta
  python -m experiments.pretrain --config=experiments/configs/meta.py:smoke --workdir=runs/smoke

When the configured datasets are missing, the collection stages (`experiments.collect`) run first
into `<workdir>/data` (or `--config.data.dir`), so one command goes from nothing to a trained
model. Re-running the same command with the same `--workdir` resumes from the latest valid
checkpoint and continues exactly; SIGTERM or SIGUSR1 saves a checkpoint and exits cleanly.

Multi-host: under Slurm with several tasks or on a TPU pod (`config.train.distributed`), every
process runs this same function; each reads only its rows of every batch, process 0 alone writes
the files below, and all of them write the checkpoints together.

The simulation backend is the collection's: `--config.env.backend` (auto, mjx or mujoco) is
`--config.collect.env.backend`, one value under both names.

The workdir keeps: `config.json` (resolved), `run_info.json` (command lines, versions, devices,
git revision), `metrics.jsonl` and `tensorboard/` (every loss term, gradient norms, updates/s,
data wait), `checkpoints/` (orbax) and `summary.json` (held-out prediction errors per domain).
`run_info.json` and `summary.json` record `env_backend` (this run's backend, resolved: what its
collection stages run on) and `data_backends` (per domain, the backend that simulated the
dataset trained on, from its info; None for data recorded without one).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time

import jax
import numpy as np
from absl import app
from tqdm import tqdm

from experiments import cli, collect
from mrcom_jax.data import dataset as dataset_lib
from mrcom_jax.data import sampler as sampler_lib
from mrcom_jax.envs import env as env_lib
from mrcom_jax.envs import obs_functions, specs
from mrcom_jax.training import checkpoint as checkpoint_lib
from mrcom_jax.training import logs, sharding
from mrcom_jax.world_model import config as wm_config
from mrcom_jax.world_model import evaluation
from mrcom_jax.world_model import model as model_lib
from mrcom_jax.world_model import normalizer as normalizer_lib
from mrcom_jax.world_model import train as train_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """A loss term became NaN or Inf; the newest checkpoint is kept, and the message says which."""


# ---- configuration ----------------------------------------------------------------------------
def validate(c) -> None:
  """Raises ValueError naming the field, before any data is made or anything is compiled (no
  device, path or data check: launchers call it on another machine; `check_inputs` does those)."""
  checks = [
    (c.seed >= 0, "seed", c.seed, "must be ≥ 0"),
    (len(c.data.domains) > 0, "data.domains", tuple(c.data.domains), "needs at least one domain"),
    (
      len(set(c.data.domains)) == len(c.data.domains), "data.domains", tuple(c.data.domains),
      "has a domain twice: list each once",
    ),
    (len(c.eval.horizons) > 0, "eval.horizons", tuple(c.eval.horizons), "needs a horizon"),
    (c.train.num_updates > 0, "train.num_updates", c.train.num_updates, "must be > 0"),
    (c.train.chunk > 0, "train.chunk", c.train.chunk, "must be > 0"),
    (c.train.max_to_keep > 0, "train.max_to_keep", c.train.max_to_keep, "must be > 0"),
    (c.train.num_devices >= 0, "train.num_devices", c.train.num_devices, "must be ≥ 0"),
    (c.data.holdout_streams >= 0, "data.holdout_streams", c.data.holdout_streams, "must be ≥ 0"),
    (
      c.data.normalizer_records > 0, "data.normalizer_records", c.data.normalizer_records,
      "must be > 0",
    ),
    (c.data.prefetch >= 1, "data.prefetch", c.data.prefetch, "must be ≥ 1"),
    (c.eval.burn_in >= 1, "eval.burn_in", c.eval.burn_in, "must be ≥ 1"),
    (c.eval.windows >= 1, "eval.windows", c.eval.windows, "must be ≥ 1"),
    (
      c.train.checkpoint_every > 0 and c.train.checkpoint_every % max(c.train.chunk, 1) == 0,
      "train.checkpoint_every", c.train.checkpoint_every,
      f"must be a positive multiple of train.chunk={c.train.chunk}",
    ),
  ]  # fmt: skip
  for ok, field, value, what in checks:
    if not ok:
      raise ValueError(f"config.{field}={value} {what}")
  if c.env.backend not in env_lib.BACKENDS:  # the collection's field too: named as given here
    raise ValueError(f"config.env.backend={c.env.backend!r} must be one of {env_lib.BACKENDS}")
  for d in c.data.domains:
    if d not in collect.DOMAINS:
      raise ValueError(
        f"config.data.domains has unknown domain {d!r}: choose from {collect.DOMAINS}"
      )
  if c.data.distribution not in collect.DISTRIBUTIONS:
    raise ValueError(
      f"config.data.distribution={c.data.distribution!r}: choose one of {collect.DISTRIBUTIONS}"
    )
  if c.data.kind not in collect.DATASET_KINDS:
    raise ValueError(f"config.data.kind={c.data.kind!r}: choose one of {collect.DATASET_KINDS}")
  if c.data.obs_fn not in obs_functions.OBS_FUNCTIONS:
    raise ValueError(
      f"config.data.obs_fn={c.data.obs_fn!r}: choose one of {obs_functions.OBS_FUNCTIONS}"
    )
  if any(h < 1 for h in c.eval.horizons):
    raise ValueError(f"config.eval.horizons={tuple(c.eval.horizons)} must all be ≥ 1")
  if c.train.distributed not in ("auto", "on", "off"):
    raise ValueError(f"config.train.distributed={c.train.distributed!r}: choose auto, on or off")
  if c.data.online:
    raise NotImplementedError(
      "config.data.online=True: the online data mode of PROTOCOL.md is not implemented yet; "
      "use the offline datasets (config.data.online=False)"
    )
  wm_config.resolve(c.world_model)  # its own checks: every size ≥ 1, scales, mv_mode
  collect.validate(c.collect)


def check_inputs(c, workdir: str) -> None:
  """Everything `pretrain` can refuse before it writes, collects or compiles anything: the config
  (`validate`), this machine's devices (after joining a multi-host run) and the data (missing
  datasets must be ones `config.collect` makes).

  Raises:
    ValueError, FileNotFoundError: one line naming the field, the value and the fix.
  """
  validate(c)
  sharding.initialize_distributed(c.train.distributed)
  available = jax.device_count()
  n_dev = c.train.num_devices or available
  if n_dev > available:
    raise ValueError(
      f"config.train.num_devices={c.train.num_devices} but this machine has {available} "
      f"{jax.default_backend()} device(s): set it to at most {available} (0 = all of them)"
    )
  if c.world_model.batch_size % n_dev:
    raise ValueError(
      f"config.world_model.batch_size={c.world_model.batch_size} is not divisible by the {n_dev} "
      f"devices of the mesh; use a multiple of {n_dev} or set config.train.num_devices"
    )
  check_data(c, workdir)


# ---- data -------------------------------------------------------------------------------------
def data_dir(c, workdir: str) -> str:
  return c.data.dir or os.path.join(workdir, "data")


def check_data(c, workdir: str) -> list[str] | None:
  """The configured datasets' paths if they are all there; None if the collection stages must
  make them first.

  Raises:
    ValueError, FileNotFoundError: missing data that `config.collect` would not make here.
  """
  root = data_dir(c, workdir)
  paths = [collect.dataset_path(root, c.data.distribution, d, c.data.kind) for d in c.data.domains]
  if not all(collect.dataset_complete(p) for p in paths):
    if c.data.distribution not in c.collect.distributions:
      raise ValueError(
        f"config.data.distribution={c.data.distribution!r} has no data in {root} and is not in "
        f"config.collect.distributions={tuple(c.collect.distributions)}; add it there"
      )
    if c.data.kind not in c.collect.datasets.kinds:
      raise ValueError(
        f"config.data.kind={c.data.kind!r} has no data in {root} and is not in "
        f"config.collect.datasets.kinds={tuple(c.collect.datasets.kinds)}; add it there"
      )
    if jax.process_count() > 1:
      raise FileNotFoundError(
        f"datasets missing under {root}: in a multi-host run, make them first on one host with "
        "`python -m experiments.collect --data_dir=...` and pass --config.data.dir=..."
      )
    return None
  return paths


def ensure_datasets(c, workdir: str) -> list[dataset_lib.Dataset]:
  """Opens the configured datasets, running the collection stages first if any is missing."""
  root = data_dir(c, workdir)
  if check_data(c, workdir) is None:
    print(f"datasets missing under {root}: running the collection stages first")
    collect.run(c.collect, root, domains=tuple(c.data.domains))
  return [dataset_lib.Dataset.open(p) for p in check_data(c, workdir)]


# ---- training ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """What `pretrain` returns: the final state, where it stopped and the summary."""

  state: train_lib.TrainState
  step: int
  stopped_by: str | None
  summary: dict | None


def _check_finite(
  metrics: dict[str, np.ndarray], first_step: int, ckpt_step: int | None, verified: bool, where
):
  """Raises NonFiniteLossError naming the term, the update, the checkpoint a rerun would use
  (verified at restore, or saved by this run from finite losses) and what to do."""
  for name, values in metrics.items():
    bad = ~np.isfinite(values)
    if bad.any():
      i = int(np.argmax(bad))
      at = first_step + i + 1
      what = (
        "Lower the learning rate (--config.world_model.model_opt.lr / value_opt.lr), raise "
        "min_std, or check the data for NaNs"
      )
      if ckpt_step is None:
        kept = f"no checkpoint had been written yet. {what}; rerunning starts afresh."
      else:
        how = (
          "this run resumed from it after checking its leaf digests and finiteness"
          if verified
          else "saved by this run from finite losses; it is checked when restored"
        )
        kept = (
          f"the newest checkpoint is update {ckpt_step} in {where} ({how}). {what}, then rerun: "
          f"the run resumes from update {ckpt_step} (unchanged, it would repeat the same updates "
          f"and diverge again at update {at}); to start from an earlier save, move "
          f"{where}/{ckpt_step} aside."
        )
      raise NonFiniteLossError(
        f"loss term {name!r} became {values[i]} at update {at}. Training stopped; {kept}"
      )


def pretrain(c, workdir: str, *, stop_after: int | None = None, verbose: bool = True) -> Run:
  """Runs (or resumes) pretraining; returns the final state and the held-out summary.

  Args:
    c: a `meta.py` config.
    workdir: run directory.
    stop_after: stop (with a checkpoint) once this many updates are done, as if pre-empted
      (tests use it to emulate a kill on a chunk boundary).
    verbose: progress bar and printed summary.
  """
  check_inputs(c, workdir)  # bad input fails here, before anything is written
  os.makedirs(workdir, exist_ok=True)
  datasets = ensure_datasets(c, workdir)
  wm = c.world_model
  mesh = sharding.make_mesh(c.train.num_devices or None)
  window = wm.context_len + wm.seq_len
  sampler = sampler_lib.WindowSampler(
    datasets, window=window, context_len=wm.context_len, batch_size=wm.batch_size,
    obs_fn=c.data.obs_fn, seed=c.seed, mesh=mesh, holdout_streams=c.data.holdout_streams,
    prefetch=c.data.prefetch,
  )  # fmt: skip
  primary = sharding.is_primary()
  backends = {"env_backend": collect.resolved_backend(c.collect),
              "data_backends": {ds.domain: ds.info.get("backend") for ds in datasets}}  # fmt: skip
  if primary:
    logs.write_run_info(workdir, c, {"mesh": dict(mesh.shape), **backends})
  normalizer = sharding.from_primary(
    sampler_lib.fit_normalizer(
      datasets,
      c.data.obs_fn,
      c.seed,
      num_records=c.data.normalizer_records,
      holdout_streams=c.data.holdout_streams,
    )
    if primary
    else normalizer_lib.Normalizer.identity()
  )  # fitted on process 0's reads only, then shared
  state = train_lib.init_train_state(wm, jax.random.PRNGKey(c.seed), normalizer)
  state = sharding.replicate(state, mesh)
  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=c.train.max_to_keep,
    async_save=c.train.async_checkpoint,
  )
  start = 0
  restored = ckpt.restore_latest(state, config=c.to_dict())
  if restored is not None:
    start, state, _ = restored
    if primary:
      print(f"resuming from the checkpoint at update {start}")
  train_step = train_lib.make_train_step(wm, mesh)
  writer = logs.MetricWriter(workdir, resume_step=start, active=primary)
  total = c.train.num_updates
  step, last_ckpt, stopped_by = start, (start if restored is not None else None), None
  bar = tqdm(
    total=total, initial=start, unit="upd", disable=not (verbose and primary), dynamic_ncols=True
  )
  try:
    with logs.StopFlag() as stop:
      batches = sampler.batches(start=start)
      while step < total:
        n = min(c.train.chunk, total - step)
        t0, wait0 = time.perf_counter(), sampler.wait_seconds
        chunk_metrics = []
        for _ in range(n):
          state, metrics = train_step(state, next(batches))
          chunk_metrics.append(metrics)
        fetched = jax.device_get(chunk_metrics)
        elapsed = time.perf_counter() - t0
        stacked = {k: np.stack([m[k] for m in fetched]) for k in fetched[0]}
        verified = restored is not None and last_ckpt == start  # the one it resumed from
        _check_finite(stacked, step, last_ckpt, verified, ckpt.directory)
        step += n
        scalars = {k: float(v.mean()) for k, v in stacked.items()}
        scalars["updates_per_s"] = n / elapsed
        scalars["transitions_per_s"] = n * wm.batch_size * wm.seq_len / elapsed
        scalars["data_wait_fraction"] = (sampler.wait_seconds - wait0) / elapsed
        writer.write(step, scalars)
        bar.update(n)
        bar.set_postfix(loss=f"{scalars['total']:.3f}", ups=f"{scalars['updates_per_s']:.1f}")
        stopped_by = stop.reason(step, stop_after)
        if step % c.train.checkpoint_every == 0 or step == total or stopped_by:
          ckpt.save(step, state, {"step": step, "data_position": step, "config": c.to_dict()})
          last_ckpt = step
        if stopped_by:
          break
  finally:
    bar.close()
    ckpt.close()
    writer.close()
    sampler.close()
  if stopped_by:
    if primary:
      print(f"stopped by {stopped_by} at update {step}; checkpoint saved, rerun to resume")
    return Run(state, step, stopped_by, None)
  summary = summarise(c, state, sampler, workdir, backends)
  if verbose and primary:
    print_summary(summary)
  return Run(state, step, None, summary)


# ---- held-out summary -------------------------------------------------------------------------
_open_loop_errors = jax.jit(evaluation.open_loop_errors, static_argnums=(0, 3, 4))


def summarise(c, state: train_lib.TrainState, sampler, workdir: str, backends: dict) -> dict:
  """One-step and multi-step open-loop prediction error per domain on held-out episodes, with
  `backends` ({'env_backend', 'data_backends'}, as in run_info.json).

  Every process computes it (each reads its share of the held-out windows, then all are
  gathered); process 0 writes `summary.json`.
  """
  wm = c.world_model
  world_model = model_lib.make_world_model(wm)
  variables = jax.device_get(state.variables)
  horizons = tuple(int(h) for h in c.eval.horizons)
  burn_in = int(c.eval.burn_in)
  window = wm.context_len + burn_in + max(horizons)
  n_domains = len(c.data.domains)
  batch = sampler.holdout_batch(c.eval.windows * n_domains, window=window, seed=c.seed + 1)
  batch = sharding.to_host(batch)
  domains = np.asarray(batch.domain)
  out = {"updates": int(state.step), "windows_per_domain": int(c.eval.windows), **backends,
         "domains": {}}  # fmt: skip
  errors = np.asarray(
    _open_loop_errors(
      world_model, variables, batch, burn_in, max(horizons), jax.random.PRNGKey(c.seed)
    )
  )  # [rows, max horizon]: one rollout serves every horizon
  for h in horizons:
    err = errors[:, :h].mean(axis=1)
    for d in sorted(set(domains.tolist())):
      name = specs.DOMAINS[d].name
      out["domains"].setdefault(name, {})[f"mse_{h}_step"] = float(err[domains == d].mean())
  metrics = logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  if metrics:
    k = max(1, math.ceil(len(metrics) / 10))
    out["loss_first"] = float(np.mean([m["total"] for m in metrics[:k]]))
    out["loss_last"] = float(np.mean([m["total"] for m in metrics[-k:]]))
  if sharding.is_primary():
    logs.write_json(os.path.join(workdir, "summary.json"), out)
  return out


def print_summary(summary: dict) -> None:
  print(f"held-out open-loop prediction error (normalised MSE) after {summary['updates']} updates")
  for name, errs in summary["domains"].items():
    cols = "  ".join(f"{k.removeprefix('mse_')} {v:.4f}" for k, v in errs.items())
    print(f"  {name:8s} {cols}")
  if "loss_first" in summary:
    print(f"  loss {summary['loss_first']:.3f} (first 10%) → {summary['loss_last']:.3f} (last 10%)")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  c, workdir = RUN_FLAGS.config.value, RUN_FLAGS.workdir.value
  cli.exit_on_bad_input(check_inputs, c, workdir)  # one line, no traceback
  try:
    pretrain(c, workdir)
  except collect.StageStopped as e:  # stopped while collecting its data: rerun to resume
    print(e)
  except collect.BackendSwitch as e:  # a collection job refused before compiling anything
    sys.exit(f"error: {e}")


RUN_FLAGS = cli.RunFlags(
  "experiments/configs/meta.py",
  "Pretraining config file (preset after ':').",
  "runs/meta",
  "Run directory: checkpoints, metrics, config, summary (and data).",
)
define_flags = RUN_FLAGS.define  # launchers: define_flags(flag_values, sys_argv)


if __name__ == "__main__":
  cli.run(main, define_flags, "experiments/configs/meta.py")
