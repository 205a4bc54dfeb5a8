"""The Ray layer, thin: actors and remote functions that take small specs, hold or load the
model inside the worker, call editing_core and return small results.

Importing this package does no work; ray is imported only when a worker is started.
"""
