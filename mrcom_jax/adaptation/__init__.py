"""Scenario adaptation (METHOD.md, Algorithm 2)."""
