"""Context encoder: a transformer over the k most recent transitions (METHOD.md Eq. 4).

Tokens come from the per-domain token maps φ_i (Eq. 5). Slots with no transition are replaced
by a learned `empty` token, so attention always runs over k real vectors and nothing under an
empty slot reaches the output. `c_t` is the encoder's output at the newest token.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def head_width(embed: int, num_heads: int) -> int:
  """Features per head: ⌈E / heads⌉ (METHOD.md: 3 heads of 43 for E = 128)."""
  return math.ceil(embed / num_heads)


class Attention(nn.Module):
  """Multi-head dot-product attention with ⌈E / heads⌉ features per head, projected back to E.

  The key projection has no bias: softmax is invariant to it, so its gradient would be pure
  rounding noise (which Adam's first step would amplify to ±lr).

  Attributes:
    embed: output width E.
    num_heads: heads.
  """

  embed: int
  num_heads: int

  @nn.compact
  def __call__(self, query: jax.Array, context: jax.Array) -> jax.Array:
    """query: [N, q, E], context: [N, k, E] -> [N, q, E]."""
    shape = (self.num_heads, head_width(self.embed, self.num_heads))
    q = nn.DenseGeneral(shape, name="query")(query)  # [N, q, H, Dh]
    k = nn.DenseGeneral(shape, use_bias=False, name="key")(context)  # [N, k, H, Dh]
    v = nn.DenseGeneral(shape, name="value")(context)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(shape[1]).astype(q.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), v)
    return nn.DenseGeneral(self.embed, axis=(-2, -1), name="out")(out)


class EncoderBlock(nn.Module):
  """A pre-LayerNorm transformer block: attention, then a ReLU feed-forward of ff_mult·E.

  Attributes:
    embed: width E.
    num_heads: attention heads; each has ⌈E / heads⌉ features, projected back to E.
    ff_mult: feed-forward width as a multiple of E.
    newest_only: compute the output at the newest (last) token only. Equal to slicing the
      full block's output there, at 1/k of the cost; used by the last block.
  """

  embed: int
  num_heads: int
  ff_mult: int = 4
  newest_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, k, E] -> [N, k, E], or [N, 1, E] with newest_only."""
    y = nn.LayerNorm(name="ln_attn")(x)
    query = y[:, -1:] if self.newest_only else y
    x = (x[:, -1:] if self.newest_only else x) + Attention(self.embed, self.num_heads, name="attn")(
      query, y
    )
    y = nn.LayerNorm(name="ln_ff")(x)
    y = nn.Dense(self.ff_mult * self.embed, name="ff_in")(y)
    return x + nn.Dense(self.embed, name="ff_out")(nn.relu(y))


class ContextEncoder(nn.Module):
  """Transformer encoder over a window of k tokens with learned positions and `empty` token.

  Attributes:
    embed: width E.
    context_len: k, the number of slots.
    num_heads: attention heads (3).
    num_layers: blocks (1).
    ff_mult: feed-forward multiple (4).
  """

  embed: int
  context_len: int
  num_heads: int = 3
  num_layers: int = 1
  ff_mult: int = 4

  @nn.compact
  def __call__(self, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Encodes windows, oldest token first.

    Args:
      tokens: [N, k, E] float32 token embeddings.
      valid: [N, k] bool; False slots become the learned `empty` token.

    Returns:
      c: [N, E] float32, the output at the newest token.
    """
    _, k, e = tokens.shape
    assert k == self.context_len and e == self.embed, (tokens.shape, self.context_len)
    empty = self.param("empty", nn.initializers.normal(0.02), (self.embed,))
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context_len, self.embed))
    x = jnp.where(valid[..., None], tokens, empty) + pos
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = EncoderBlock(
        self.embed, self.num_heads, self.ff_mult, newest_only=last, name=f"block_{i}"
      )(x)
    return nn.LayerNorm(name="ln_out")(x[:, -1])
