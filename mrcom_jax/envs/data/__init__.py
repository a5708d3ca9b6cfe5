"""Versioned data tables shipped with the package (σ_d, see `mrcom_jax/envs/obs_scale.py`)."""
