"""The padded multi-domain training batch (the data pipeline's contract with the model).

Row b is one scenario's stream of K + T consecutive steps (K = context_len). The first K steps
are only context for the first training step; the last T are the training window. The context
C_t of training step t is the K steps before t in the same row (sliding, METHOD.md Eq. 4).

Time indexing (METHOD.md, Notation): at step t the row holds o_t, the action a_t taken at o_t,
and r_t, the reward of s_t (0 at an episode's first step). `first[t]` restarts the latent
(h, z, u) and zeroes the previous action; the context window does not restart. A step with
`valid[t] = False` holds no transition: in a context window it becomes the learned `empty`
token, and as a training step it gets no loss. A model step, TD target or Eq. 15 pair (t, t+1)
exists only where both steps are valid and `first[t+1]` is False, so none spans two episodes;
at truncation the stored last observation is the bootstrap state.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class Batch:
  """B streams of K + T steps; widths padded to OBS_PAD = 27 and ACT_PAD = 6.

  Attributes:
    obs: [B, K+T, 27] float32, raw (unnormalised) observations after the observation function.
    action: [B, K+T, 6] float32, a_t taken at o_t, in [-1, 1].
    reward: [B, K+T] float32, r_t, the reward of s_t; 0 at an episode's first step.
    first: [B, K+T] bool, episode start.
    valid: [B, K+T] bool, a transition exists at this slot.
    domain: [B] int32, domain id (specs.DOMAINS order).
    obs_mask: [B, 27] float32, 1 on the valid observation entries.
    act_mask: [B, 6] float32, 1 on the valid action entries.
    xi: [B, 6] float32, scenario descriptor ξ = (domain one-hot, α_len, α_size, β).
  """

  obs: jax.Array
  action: jax.Array
  reward: jax.Array
  first: jax.Array
  valid: jax.Array
  domain: jax.Array
  obs_mask: jax.Array
  act_mask: jax.Array
  xi: jax.Array

  @property
  def batch_size(self) -> int:
    return self.obs.shape[0]

  @property
  def length(self) -> int:
    """K + T."""
    return self.obs.shape[1]

  def window(self, context_len: int) -> Batch:
    """The training window: the last T = length − K steps of every per-step field."""
    return self.replace(
      obs=self.obs[:, context_len:],
      action=self.action[:, context_len:],
      reward=self.reward[:, context_len:],
      first=self.first[:, context_len:],
      valid=self.valid[:, context_len:],
    )
