"""Pipelines as data: YAML specs validated before any Ray call, the runner, and the CLI.

Importing this package does no work (no Ray, no MLflow, no file reads).
"""
