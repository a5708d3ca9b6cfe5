"""Scenarios and the scenario distributions of settings (a)–(d) (PROTOCOL.md, "Settings").

A scenario is (domain, α_len, α_size, β). A distribution is a small immutable value: ranges of α
(drawn independently for length and thickness) and of β, each a union of intervals drawn with
weight proportional to length. It serialises to a dict so it can be saved beside results.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mrcom_jax.envs import specs

Interval = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One scenario: a domain, its torso factors and its target-speed fraction β."""

  domain: str
  alpha_len: float = 1.0
  alpha_size: float = 1.0
  beta: float = 0.8

  def __post_init__(self):
    specs.get_domain(self.domain)
    for name in ("alpha_len", "alpha_size", "beta"):
      value = getattr(self, name)
      if not (np.isfinite(value) and value > 0):
        raise ValueError(f"Scenario.{name}={value}: must be a positive number")
    if self.beta > 1:
      raise ValueError(f"Scenario.beta={self.beta}: the target v* = β·v_max needs β ≤ 1")

  @property
  def descriptor(self) -> np.ndarray:
    """ξ = (domain one-hot, α_len, α_size, β): [6] float32."""
    return specs.descriptor(
      specs.get_domain(self.domain).id, self.alpha_len, self.alpha_size, self.beta
    )


def _check_intervals(name: str, intervals: tuple[Interval, ...]) -> None:
  if not intervals:
    raise ValueError(f"{name}: needs at least one interval")
  for lo, hi in intervals:
    if not lo <= hi:
      raise ValueError(f"{name}: interval ({lo}, {hi}) has lower > upper")
    if name == "alpha" and lo <= 0:
      raise ValueError(
        f"alpha interval ({lo}, {hi}) would give a non-positive torso length or thickness: "
        "choose δ < 1 so that 1 - δ > 0"
      )
    if name == "beta" and not (0 < lo and hi <= 1):
      raise ValueError(f"beta interval ({lo}, {hi}) must lie in (0, 1]")


def _draw(rng: np.random.Generator, intervals: tuple[Interval, ...], n: int) -> np.ndarray:
  lengths = np.array([hi - lo for lo, hi in intervals], np.float64)
  probs = (
    lengths / lengths.sum() if lengths.sum() > 0 else np.full(len(intervals), 1 / len(intervals))
  )
  which = rng.choice(len(intervals), size=n, p=probs)
  lo = np.array([intervals[i][0] for i in which])
  hi = np.array([intervals[i][1] for i in which])
  return lo + (hi - lo) * rng.uniform(size=n)


@dataclasses.dataclass(frozen=True)
class ScenarioDistribution:
  """Uniform α_len, α_size (each from `alpha`) and β (from `beta`), unions of intervals."""

  name: str
  alpha: tuple[Interval, ...]
  beta: tuple[Interval, ...]

  def __post_init__(self):
    _check_intervals("alpha", self.alpha)
    _check_intervals("beta", self.beta)

  def sample(self, rng: np.random.Generator, domain: str, n: int) -> list[Scenario]:
    """Draws `n` scenarios of `domain` (α_len, α_size, β independent)."""
    specs.get_domain(domain)
    a_len, a_size = _draw(rng, self.alpha, n), _draw(rng, self.alpha, n)
    beta = _draw(rng, self.beta, n)
    return [Scenario(domain, float(x), float(y), float(b)) for x, y, b in zip(a_len, a_size, beta)]

  def to_dict(self) -> dict:
    return {
      "name": self.name,
      "alpha": [list(i) for i in self.alpha],
      "beta": [list(i) for i in self.beta],
    }

  @classmethod
  def from_dict(cls, d: dict) -> ScenarioDistribution:
    return cls(d["name"], tuple(map(tuple, d["alpha"])), tuple(map(tuple, d["beta"])))

  def with_beta(self, beta: float) -> ScenarioDistribution:
    """The same α ranges with β fixed (Table 2 uses β = 0.8)."""
    return dataclasses.replace(self, name=f"{self.name}@beta={beta}", beta=((beta, beta),))


def _ball(delta: float) -> tuple[Interval, ...]:
  return ((1.0 - delta, 1.0 + delta),)


def _ring(inner: float, outer: float) -> tuple[Interval, ...]:
  return ((1.0 - outer, 1.0 - inner), (1.0 + inner, 1.0 + outer))


# setting -> (train δ, train β, eval α ring (inner, outer) or None, eval β intervals or None)
SETTINGS = {
  "a": (0.2, ((0.5, 0.8),), None, None),
  "b": (0.2, ((0.5, 0.8),), (0.2, 0.4), ((0.3, 0.5), (0.8, 1.0))),
  "c": (0.4, ((0.3, 0.9),), None, None),
  "d": (0.4, ((0.3, 0.9),), (0.4, 0.6), ((0.1, 0.3), (0.9, 1.0))),
}
SPLITS = ("train", "eval")


def get_distribution(setting: str, split: str = "train") -> ScenarioDistribution:
  """The training or evaluation distribution of setting 'a', 'b', 'c' or 'd'.

  In-distribution settings (a, c) evaluate on their training ranges; (b, d) evaluate on the
  out-of-distribution rings. Open and closed interval ends are the same for a continuous draw.
  """
  if setting not in SETTINGS:
    raise ValueError(f"unknown setting {setting!r}: choose one of {sorted(SETTINGS)}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
  delta, beta, ring, eval_beta = SETTINGS[setting]
  if split == "train" or ring is None:
    return ScenarioDistribution(f"{setting}/{split}", _ball(delta), beta)
  return ScenarioDistribution(f"{setting}/{split}", _ring(*ring), eval_beta)


def fixed_dynamics(beta: tuple[Interval, ...] = ((0.5, 0.8),)) -> ScenarioDistribution:
  """Table 5: α = 1, β in [0.5, 0.8]."""
  return ScenarioDistribution("fixed_dynamics", ((1.0, 1.0),), beta)
