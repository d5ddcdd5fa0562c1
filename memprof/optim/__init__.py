"""Optimizers: the registry, the training-loop protocol, and memprof's own implementations."""
