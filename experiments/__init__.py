"""Reproductions of the reference results, one script per experiment (docs/experiments.md)."""
