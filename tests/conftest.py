"""Test-wide JAX settings, set once before any test touches a device (as equinox's conftest does):
rank promotion raises, so a silent broadcast is a bug; 8 fake CPU devices, so the mesh code runs
as it would on one host with 8 accelerators. Single-device code simply uses the first of them."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_num_cpu_devices", 8)
