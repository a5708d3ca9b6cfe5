"""World-model configuration: every size and loss scale, paper values by default.

`get_config()` gives the paper's sizes (METHOD.md, Appendix D and its [choice] values);
`tiny()` gives the smoke preset's sizes (PROTOCOL.md). The four ablations of METHOD.md are
boolean switches of the same code. Values derived from the config (head width, effective loss
scales, which networks exist) are computed by `resolve`, never written back.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mrcom_jax.envs import specs
from mrcom_jax.models import context

ABLATIONS = ("no_deterministic", "no_context", "no_meta_state", "no_meta_value")


def _optimizer(lr: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      lr=lr,  # AdamW learning rate
      weight_decay=1e-4,  # the paper's "decay weight", read as AdamW weight decay
      clip_norm=100.0,  # global-norm gradient clipping [choice]
    )
  )


def get_config() -> ml_collections.ConfigDict:
  """The paper's world model (METHOD.md); `config.<field>` overrides any value."""
  c = ml_collections.ConfigDict()
  c.embed = 128  # E: shared width of encoders, tokens and the context embedding
  c.context_len = 20  # k: transitions in a context window (sliding)
  c.num_heads = 3  # attention heads; each ⌈E/3⌉ wide, projected back to E
  c.num_layers = 1  # transformer blocks
  c.ff_mult = 4  # transformer feed-forward width / E
  c.stoch = 128  # S: width of z
  c.deter = 128  # D: width of h (GRU)
  c.aux = 32  # U: width of u [choice]
  c.hidden = 256  # hidden width of every MLP [choice]
  c.mlp_layers = 2  # hidden layers of every "3-layer" MLP
  c.min_std = 0.1  # σ = softplus(·) + min_std for every Gaussian
  c.free_bits = 1.0  # nats, per KL term of Eq. 10 (summed over dimensions)
  c.lambda_ms = 0.1  # λ_ms, meta-state bound (Eq. 12, 16)
  c.lambda_mv = 1.0  # λ_mv, meta-value alignment (Eq. 15, 16)
  c.lambda_v = 1.0  # λ_V, value terms L_V + L_TD (Eq. 13-14, 16)
  c.discount = 0.99  # γ of the scenario value
  c.target_tau = 0.005  # Polyak rate of the target value network V̄
  c.mv_mode = "match"  # Eq. 15: "match" (V_meta(ŝ) vs sg V_meta(s̃)) or "bellman" residual
  c.mv_normalize = True  # Eq. 15: L_mv / (batch variance of its target sg V_meta + 1e-6)
  c.batch_size = 32  # B windows per update
  c.seq_len = 64  # T training steps per window (plus k context steps before them)
  c.scan_unroll = 1  # lax.scan unroll of the posterior filter (FLOP counting unrolls fully)
  c.model_opt = _optimizer(1e-4)  # world model and r_ψ
  c.value_opt = _optimizer(1e-4)  # V and V_meta
  # Ablations (METHOD.md, Section 5.3): switches of the same code.
  c.no_deterministic = False  # no h: latent [z, u]
  c.no_context = False  # no context encoder; c_t is a learned constant
  c.no_meta_state = False  # λ_ms = 0 and no r_ψ
  c.no_meta_value = False  # no value networks, λ_V = λ_mv = 0
  return c


def tiny() -> ml_collections.ConfigDict:
  """The smoke preset's sizes (PROTOCOL.md): E = 33 (3 heads × 11), S 16, D 32, U 8."""
  c = get_config()
  c.embed = 33
  c.stoch = 16
  c.deter = 32
  c.aux = 8
  c.hidden = 64
  c.context_len = 8
  c.seq_len = 16
  c.batch_size = 6
  return c


def with_ablation(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `config` with the ablation `name` (one of ABLATIONS) switched on."""
  if name not in ABLATIONS:
    raise ValueError(f"unknown ablation {name!r}: choose one of {', '.join(ABLATIONS)}")
  c = ml_collections.ConfigDict(config.to_dict())
  c[name] = True
  return c


@dataclasses.dataclass(frozen=True)
class Spec:
  """Resolved, hashable sizes and switches: what the networks and losses read."""

  embed: int
  qkv: int  # attention features: heads · ⌈E / heads⌉
  context_len: int
  num_heads: int
  num_layers: int
  ff_mult: int
  stoch: int
  deter: int  # 0 under no_deterministic
  aux: int
  hidden: tuple[int, ...]
  min_std: float
  free_bits: float
  lambda_ms: float  # 0 under no_meta_state
  lambda_mv: float  # 0 under no_meta_value
  lambda_v: float  # 0 under no_meta_value
  discount: float
  target_tau: float
  mv_mode: str
  mv_normalize: bool
  scan_unroll: int
  use_context: bool
  use_meta_state: bool
  use_meta_value: bool
  num_domains: int = specs.NUM_DOMAINS
  obs_dim: int = specs.OBS_PAD
  act_dim: int = specs.ACT_PAD
  xi_dim: int = specs.XI_DIM

  @property
  def feat(self) -> int:
    """Width of s̃ = [z, h, u]."""
    return self.stoch + self.deter + self.aux


_SIZES = ("embed", "context_len", "num_heads", "num_layers", "ff_mult", "stoch", "aux", "hidden",
          "mlp_layers", "batch_size", "seq_len", "scan_unroll")  # fmt: skip


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field out of range, its value and the allowed range."""
  sizes = (*_SIZES, *(() if config.no_deterministic else ("deter",)))
  checks = [(n, config[n], "an integer ≥ 1", type(config[n]) is int and config[n] >= 1)
            for n in sizes]  # fmt: skip
  for n in ("free_bits", "lambda_ms", "lambda_mv", "lambda_v"):
    checks.append((n, config[n], "≥ 0", config[n] >= 0))  # also refuses NaN
  tau, gamma = config.target_tau, config.discount
  checks += [("min_std", config.min_std, "> 0", config.min_std > 0),
             ("discount", gamma, "in [0, 1)", 0 <= gamma < 1),
             ("target_tau", tau, "in (0, 1]", 0 < tau <= 1)]  # fmt: skip
  for opt in ("model_opt", "value_opt"):
    o = config[opt]
    checks += [(f"{opt}.lr", o.lr, "> 0", o.lr > 0),
               (f"{opt}.weight_decay", o.weight_decay, "≥ 0", o.weight_decay >= 0),
               (f"{opt}.clip_norm", o.clip_norm, "> 0", o.clip_norm > 0)]  # fmt: skip
  for name, value, what, ok in checks:
    if not ok:
      default = get_config()[name.split(".")[0]]
      default = default[name.split(".")[1]] if "." in name else default
      raise ValueError(
        f"config.world_model.{name}={value!r} must be {what} (the paper's value is {default})"
      )


def resolve(config: ml_collections.ConfigDict) -> Spec:
  """Derives the networks' sizes and the effective loss scales from a config.

  Raises:
    ValueError: a field out of range (a size < 1, a negative scale, ...); the message names the
      field and its value.
  """
  if config.mv_mode not in ("match", "bellman"):
    raise ValueError(f"mv_mode must be 'match' or 'bellman', got {config.mv_mode!r}")
  _check_ranges(config)
  meta_value = not config.no_meta_value
  meta_state = not config.no_meta_state
  return Spec(
    embed=config.embed,
    qkv=config.num_heads * context.head_width(config.embed, config.num_heads),
    context_len=config.context_len,
    num_heads=config.num_heads,
    num_layers=config.num_layers,
    ff_mult=config.ff_mult,
    stoch=config.stoch,
    deter=0 if config.no_deterministic else config.deter,
    aux=config.aux,
    hidden=(config.hidden,) * config.mlp_layers,
    min_std=config.min_std,
    free_bits=config.free_bits,
    lambda_ms=config.lambda_ms if meta_state else 0.0,
    lambda_mv=config.lambda_mv if meta_value else 0.0,
    lambda_v=config.lambda_v if meta_value else 0.0,
    discount=config.discount,
    target_tau=config.target_tau,
    mv_mode=config.mv_mode,
    mv_normalize=bool(config.mv_normalize),
    scan_unroll=config.scan_unroll,
    use_context=not config.no_context,
    use_meta_state=meta_state,
    use_meta_value=meta_value,
  )
