"""Side effects: MLflow tracking (and later the registry, Serve, the scheduler, cluster helpers).

Importing this package does no work; mlflow is imported inside the functions that use it.
"""
