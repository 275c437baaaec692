"""Mesh, logical-axis rules, shardings and multi-host start-up: the only package that knows mesh
axis names. Importing it keeps JAX from probing an installed libtpu on a machine without TPUs
(see parallel/platforms.py); every entry point imports it before JAX picks a backend."""

from parallel.platforms import avoid_tpu_probe

avoid_tpu_probe()
