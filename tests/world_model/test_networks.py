"""Network pieces: attention, the newest-only block, per-domain layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrcom_jax.models import context, mlp


def test_attention_equals_flax_multi_head_attention():
  e, heads = 33, 3
  x = jax.random.normal(jax.random.key(0), (2, 8, e))
  att = context.Attention(e, heads)
  p = att.init(jax.random.key(1), x[:, -1:], x)["params"]
  mha = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=33, out_features=e)
  q = {n: p[n] for n in ("query", "value", "out")}
  q["key"] = {"kernel": p["key"]["kernel"], "bias": jnp.zeros((heads, 11))}
  np.testing.assert_allclose(
    att.apply({"params": p}, x[:, -1:], x), mha.apply({"params": q}, x[:, -1:], x, x), atol=1e-5
  )


def test_newest_only_block_equals_the_full_block_at_the_newest_token():
  x = jax.random.normal(jax.random.key(0), (3, 8, 33))
  full = context.EncoderBlock(33, 3)
  p = full.init(jax.random.key(1), x)
  last = context.EncoderBlock(33, 3, newest_only=True)
  np.testing.assert_allclose(last.apply(p, x)[:, 0], full.apply(p, x)[:, -1], atol=1e-5)


def test_empty_slots_hide_their_tokens():
  enc = context.ContextEncoder(33, 8)
  tok = jax.random.normal(jax.random.key(0), (2, 8, 33))
  valid = jnp.array([[True] * 8, [False] * 3 + [True] * 5])
  p = enc.init(jax.random.key(1), tok, valid)
  c = enc.apply(p, tok, valid)
  c2 = enc.apply(p, tok.at[1, :3].set(100.0), valid)
  np.testing.assert_array_equal(c[1], c2[1])
  assert c.shape == (2, 33)


def test_domain_dense_uses_each_rows_own_weights():
  layer = mlp.DomainDense(4, 3)
  x = jnp.ones((3, 2, 5))
  p = layer.init(jax.random.key(0), x, jnp.array([0, 1, 2]))
  p = jax.tree.map(lambda a: a, p)
  kernel = jnp.stack([jnp.full((5, 4), float(d + 1)) for d in range(3)])
  p["params"]["kernel"] = kernel
  y = layer.apply(p, x, jnp.array([2, 0, 1]))
  np.testing.assert_allclose(y[:, 0, 0], [15.0, 5.0, 10.0])  # 5 inputs × weight (d + 1)
