"""Small synthetic datasets whose records say where they come from.

Record j of the stream with global id s holds obs[k] = 10000·s + step + k with step = step0 + j,
so a test can read a window's stream and steps back from its observations.
"""

from __future__ import annotations

import numpy as np

from mrcom_jax.data import dataset as dataset_lib
from mrcom_jax.envs import specs

EPISODE_LENGTH = 9  # 10 records per episode


def make_chunk(domain: str, streams, n_episodes: int, episode_length: int = EPISODE_LENGTH):
  """The arrays of one chunk of `len(streams)` streams of `n_episodes` episodes each.

  Args:
    domain: domain name.
    streams: global stream ids, one per row.
    n_episodes: episodes per stream.
    episode_length: control steps per episode.

  Returns:
    A dict of DatasetWriter.append's arguments. step0 of stream s is 100·s (a multiple of the
    episode's record count, so `first` ⇔ step % (episode_length + 1) == 0).
  """
  spec = specs.get_domain(domain)
  streams = np.asarray(streams, np.int32)
  s, e = len(streams), episode_length + 1
  length = n_episodes * e
  step0 = (100 * streams).astype(np.int32)
  step = step0[:, None] + np.arange(length)
  obs = 10000.0 * streams[:, None, None] + step[..., None] + np.arange(spec.obs_dim)
  first, last = dataset_lib.episode_pattern(length, episode_length)
  rngs = [np.random.default_rng(int(i)) for i in streams]  # a stream's values depend on it only
  reward = np.stack([r.uniform(0, 1, length) for r in rngs]).astype(np.float32) * ~first
  action = np.stack([r.uniform(-1, 1, (length, spec.act_dim)) for r in rngs]).astype(np.float32)
  xi = np.stack([specs.descriptor(spec.id, 1.0 + 0.01 * i, 0.9, 0.6) for i in streams])
  return dict(
    obs=obs.astype(np.float32),
    action=action,
    reward=reward,
    first=np.broadcast_to(first, (s, length)).copy(),
    last=np.broadcast_to(last, (s, length)).copy(),
    xi=xi,
    stream=streams,
    step0=step0,
  )


def write_dataset(path, domain: str, chunks, kind: str = "mix", info=None):
  """Writes and closes a dataset of `chunks` = [(stream ids, n_episodes), ...]; returns it."""
  writer = dataset_lib.DatasetWriter(path, domain, kind, EPISODE_LENGTH, info=info)
  for streams, n_episodes in chunks:
    writer.append(**make_chunk(domain, streams, n_episodes))
  return writer.close()
