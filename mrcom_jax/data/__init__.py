"""Behaviour datasets on disk (`dataset`) and the pretraining window sampler (`sampler`)."""
