"""Agents: the jitted SAC and the per-domain collection runner."""
