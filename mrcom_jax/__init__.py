"""mrcom-jax: MrCoM, a unified world model across robot scenarios, in JAX/Flax with MuJoCo MJX."""

__version__ = "0.1.0"
