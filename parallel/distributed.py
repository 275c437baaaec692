"""Multi-host start-up: JAX's own multi-controller runtime, initialised when the environment
says this is one process of many (TPU pod worker, SLURM task, or explicit variables).

Explicit variables (any cluster, and localhost CPU tests):
  JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i
On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax
from absl import logging

_INITIALIZED = False


def multihost_environment() -> str | None:
  """Names the multi-host environment detected, or None for a single process."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
    return "explicit"
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env:
    return "slurm"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize` once if this is one process of a multi-host job."""
  global _INITIALIZED
  kind = multihost_environment()
  if _INITIALIZED or kind is None:
    return
  if kind == "explicit":
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    # SLURM and Cloud TPU environments are detected by JAX itself.
    jax.distributed.initialize()
  _INITIALIZED = True
  logging.info("jax.distributed initialised (%s): process %d of %d, %d global devices", kind,
               jax.process_index(), jax.process_count(), jax.device_count())
