"""Adaptation results: PROTOCOL.md's normalised score, the per-seed table and learning curves.

`normalised = 100 · (R − R_rand) / (R_ref − R_rand)` with R the adapted policy's mean return,
R_rand the uniform-random policy's and R_ref the scenario's specialist's. A scenario's score is
`None` (NaN in a table) where the reference is missing (an explicit target has no specialist) or
fails the guard `R_ref − R_rand > 0.05·|R_ref|` (the row is marked `guarded`). Per (domain,
setting, seed) the score is the ratio of means over the scenarios, guarded ones left out and
counted (`scenarios`, `scenarios_left_out`); a missing reference leaves the whole group `None`.
Tables report mean ± std over seeds with the raw returns beside them and the number of scenarios
behind each cell.
"""

from __future__ import annotations

import warnings

import numpy as np

GUARD = 0.05


def normalised_score(r: float, r_rand: float, r_ref: float | None) -> float | None:
  """100 · (R − R_rand) / (R_ref − R_rand), or None (no reference, or the guard fails)."""
  if r_ref is None:
    return None
  if (r_ref - r_rand) <= GUARD * abs(r_ref):
    warnings.warn(
      f"score is NaN: the reference return {r_ref:.3f} is not {GUARD:.0%} above the random "
      f"return {r_rand:.3f} (PROTOCOL.md score guard)",
      stacklevel=2,
    )
    return None
  return 100.0 * (r - r_rand) / (r_ref - r_rand)


def variant(config: dict) -> str:
  """The row name of a run: mrcom, or the control its switches make."""
  a = config["adapt"]
  parts = []
  if not a["model_rollouts"]:
    parts.append("no_rollouts")
  if not a["prompt"]:
    parts.append("own_context")
  if a.get("finetune_world_model"):
    parts.append("finetuned_world_model")
  return "+".join(parts) or "mrcom"


def rows(pairs: list[dict], history: dict, metadata: dict) -> list[dict]:
  """One row per pair: its scenario and seed, returns, reference, score and learning curve.

  Args:
    pairs: per pair {domain, setting, label, scenario, seed}.
    history: {'steps': [...], 'returns': [[P] per evaluation], 'random_returns': {'values',
      'source'}}.
    metadata: the collection metadata (its `specialists`, if present, give R_ref).
  """
  returns = np.asarray(history["returns"], np.float64).reshape(len(history["steps"]), len(pairs))
  specialists = metadata.get("specialists", {})
  out = []
  for i, p in enumerate(pairs):
    ref = specialists.get(p["domain"], {}).get(p["label"])
    r_ref = None if ref is None else float(ref["return"])
    r_rand = float(history["random_returns"]["values"][i])
    r = float(returns[-1, i]) if len(returns) else float("nan")
    score = normalised_score(r, r_rand, r_ref)
    out.append(
      dict(
        p,
        real_steps=int(history["steps"][-1]) if history["steps"] else 0,
        **{"return": r},
        random_return=r_rand,
        random_source=history["random_returns"]["source"][i],
        reference_return=r_ref,
        score=score,
        guarded=r_ref is not None and score is None,
        curve={"steps": list(history["steps"]), "returns": returns[:, i].tolist()},
      )
    )
  return out


def _mean_std(values: list[float | None]) -> dict:
  if not values or any(v is None for v in values):
    return {"mean": None, "std": None, "n": len(values)}
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std()), "n": len(values)}


def scores(rows_: list[dict]) -> list[dict]:
  """Per (domain, setting, seed): the ratio of means over its scenarios, and the raw returns.

  Scenarios whose own score fails the guard are left out of the ratio of means and counted
  (PROTOCOL.md, Score): `scenarios` is how many it was computed from, `scenarios_left_out` how
  many were guarded. The raw returns are means over the same scenarios (over all of them when
  none is left). The ratio of the means of unguarded scenarios passes the guard itself
  (Σ(R_ref − R_rand) > 0.05·Σ|R_ref|), so it warns only through its rows.
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows_:
    groups.setdefault((r["domain"], r["setting"], r["seed"]), []).append(r)
  out = []
  for (domain, setting, seed), rs in groups.items():
    used = [r for r in rs if not r.get("guarded", False)]
    has_ref = all(r["reference_return"] is not None for r in rs)
    mean = lambda key, rs=(used or rs): float(np.mean([r[key] for r in rs]))
    score = (
      normalised_score(mean("return"), mean("random_return"), mean("reference_return"))
      if has_ref and used
      else None
    )
    out.append(
      {
        "domain": domain, "setting": setting, "seed": seed, "scenarios": len(used),
        "scenarios_left_out": len(rs) - len(used), "score": score, "return": mean("return"),
        "random_return": mean("random_return"),
        "reference_return": mean("reference_return") if has_ref else None,
      }
    )  # fmt: skip
  return out


def table(per_seed: list[dict]) -> list[dict]:
  """Per (domain, setting): score and return as mean ± std over seeds, with the number of
  scenarios each seed's score was computed from (and left out)."""
  groups: dict[tuple, list[dict]] = {}
  for s in per_seed:
    groups.setdefault((s["domain"], s["setting"]), []).append(s)
  return [
    {
      "domain": domain,
      "setting": setting,
      "seeds": len(ss),
      "scenarios": [s["scenarios"] for s in ss],  # per seed, the scenarios behind its score
      "scenarios_left_out": [s["scenarios_left_out"] for s in ss],
      "score": _mean_std([s["score"] for s in ss]),
      "return": _mean_std([s["return"] for s in ss]),
      "random_return": _mean_std([s["random_return"] for s in ss]),
      "reference_return": _mean_std([s["reference_return"] for s in ss]),
    }
    for (domain, setting), ss in groups.items()
  ]


def summarise(config: dict, pairs: list[dict], history: dict, metadata: dict) -> dict:
  """The content of `results.json`."""
  rows_ = rows(pairs, history, metadata)
  per_seed = scores(rows_)
  return {
    "variant": variant(config),
    "rows": rows_,
    "scores": per_seed,
    "table": table(per_seed),
    "config": config,
  }


def _fmt(ms: dict, digits: int = 1) -> str:
  if ms["mean"] is None:
    return "nan"
  return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _count(cell: dict) -> str:
  """Scenarios behind a cell's seeds: '5', or '4 of 5' where guarded ones were left out."""
  used, left = cell.get("scenarios", []), cell.get("scenarios_left_out", [])
  if not used:
    return "?"
  span = lambda xs: str(min(xs)) if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}"
  total = [u + x for u, x in zip(used, left)]
  return span(used) + (f" of {span(total)}" if any(left) else "")


def print_table(results: dict) -> None:
  print(f"adaptation results ({results['variant']}): mean ± std over seeds")
  print(
    f"  {'domain':8s} {'setting':8s} {'score':>16s} {'scenarios':>14s} {'return':>16s} "
    f"{'random':>10s} {'ref':>10s}"
  )
  for t in results["table"]:
    print(
      f"  {t['domain']:8s} {t['setting']:8s} {_fmt(t['score']):>16s} {_count(t):>14s} "
      f"{_fmt(t['return']):>16s} {_fmt(t['random_return']):>10s} "
      f"{_fmt(t['reference_return']):>10s}"
    )


def plot_curves(results: dict, path: str) -> None:
  """Evaluation return against real steps, one panel per domain, one line per scenario (mean
  over seeds, shaded min–max), the random (dotted) and specialist (dashed) returns beside."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  domains = list(dict.fromkeys(r["domain"] for r in results["rows"]))
  fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.4), squeeze=False)
  for ax, domain in zip(axes[0], domains):
    mine = [r for r in results["rows"] if r["domain"] == domain]
    for j, label in enumerate(dict.fromkeys(r["label"] for r in mine)):
      rs = [r for r in mine if r["label"] == label]
      steps = np.asarray(rs[0]["curve"]["steps"])
      curves = np.asarray([r["curve"]["returns"] for r in rs])
      color = f"C{j}"
      ax.plot(steps, curves.mean(0), color=color, label=f"{label} ({len(rs)} seeds)")
      ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2)
      ax.axhline(np.mean([r["random_return"] for r in rs]), color=color, ls=":", lw=1)
      refs = [r["reference_return"] for r in rs if r["reference_return"] is not None]
      if refs:
        ax.axhline(np.mean(refs), color=color, ls="--", lw=1)
    ax.set_title(domain)
    ax.set_xlabel("real steps")
    ax.set_ylabel("evaluation return")
    ax.legend(fontsize=7)
  fig.suptitle(f"adaptation ({results['variant']}): dotted random, dashed specialist")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
