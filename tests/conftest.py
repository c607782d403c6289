"""Shared test setup: float64 everywhere (before any test module creates an array)."""

import jax

jax.config.update("jax_enable_x64", True)
