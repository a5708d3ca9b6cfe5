"""Each ablation (METHOD.md, Section 5.3) removes what it names and still trains."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcom_jax.world_model import config as config_lib
from mrcom_jax.world_model import train
from tests.world_model import conftest

REMOVED_PARAMS = {
  "": set(),
  "no_deterministic": {"gru"},
  "no_context": {"token_map", "context_encoder"},
  "no_meta_state": {"r_psi"},
  "no_meta_value": set(),
}
REMOVED_TERMS = {
  "": set(),
  "no_deterministic": set(),
  "no_context": set(),
  "no_meta_state": {"meta_state"},
  "no_meta_value": {
    "meta_value", "meta_value_align", "td", "value_mean", "grad_norm_values",
    "meta_value_align_raw", "mv_target_var",
  },
}  # fmt: skip
FULL_PARAMS = {
  "obs_encoder", "action_embed", "decoder", "token_map", "context_encoder", "prior_z",
  "posterior_z", "gru", "prior_u", "posterior_u", "reward_head", "r_psi",
}  # fmt: skip
UPDATES = 12


@pytest.fixture(scope="module")
def runs(normalizer, batch):
  """For each ablation: (initial params, values, metrics of each of UPDATES updates)."""
  out = {}
  for name in REMOVED_PARAMS:
    state = conftest.init_state_for(name)
    params, values = state.variables["params"], state.values
    step = conftest.train_step_for(name)
    history = []
    for _ in range(UPDATES):
      state, metrics = step(state, batch)
      history.append(jax.tree.map(float, metrics))
    out[name] = (params, values, history)
  return out


@pytest.mark.parametrize("name", list(REMOVED_PARAMS))
def test_ablation_removes_parameters_and_terms(runs, name, world_model):
  params, values, history = runs[name]
  assert set(params) == FULL_PARAMS - REMOVED_PARAMS[name] | (
    {"constant_context"} if name == "no_context" else set()
  )
  assert (values is None) == (name == "no_meta_value")
  full_terms = set(runs[""][2][0])
  assert set(history[0]) == full_terms - {
    f"{t}/{d}" if d else t for t in REMOVED_TERMS[name] for d in ("", "hopper", "walker", "cheetah")
  }
  spec = config_lib.resolve(
    config_lib.with_ablation(config_lib.tiny(), name) if name else config_lib.tiny()
  )
  if name == "no_deterministic":
    assert spec.deter == 0 and spec.feat == spec.stoch + spec.aux
    # The prior and posterior of z get no h: their first layers are narrower by D.
    d = world_model.spec.deter
    full_in = runs[""][0]["prior_z"]["mlp"]["hidden_0"]["kernel"].shape[0]
    assert params["prior_z"]["mlp"]["hidden_0"]["kernel"].shape[0] == full_in - d


@pytest.mark.parametrize("name", list(REMOVED_PARAMS))
def test_ablation_still_trains(runs, name):
  _, _, history = runs[name]
  totals = [m["total"] for m in history]
  assert np.isfinite(totals).all()
  assert np.mean(totals[-3:]) < np.mean(totals[:3]), totals


@pytest.mark.parametrize("name", list(REMOVED_PARAMS))
def test_ablation_logs_the_gradient_norm_of_each_term_it_keeps(name, batch):
  """The diagnostics (METHOD.md) name each term of Eq. 16 that reaches the world model."""
  kept = {"kl_z", "kl_u", "recon", "reward", "meta_state", "meta_value_align"}
  kept -= {"meta_state"} if name == "no_meta_state" else set()
  kept -= {"meta_value_align"} if name == "no_meta_value" else set()
  update = train.make_update(conftest.config_for(name))  # traced only: no compilation
  _, metrics = jax.eval_shape(update, conftest.init_state_for(name), batch)
  norms = {k.split("/", 1)[1] for k in metrics if k.startswith("grad_norm/")}
  shares = {k.split("/", 1)[1] for k in metrics if k.startswith("grad_share/")}
  assert norms == kept | {"wm"} and shares == kept
  assert {"kl_z_raw", "kl_u_raw"} <= set(metrics)
