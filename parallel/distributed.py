"""Multi-host start-up: JAX's own multi-controller runtime (`jax.distributed`), initialised when
the environment says this is one process of many. Every process runs the same program; each
sees all devices of the job and feeds only its own (see parallel/host_data.py).

Environments, checked in this order:
  explicit   JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i, optionally
             JAX_LOCAL_DEVICE_IDS=0,1 (any cluster; the localhost CPU tests).
  slurm      a task of a multi-task `srun` step; JAX reads SLURM's variables. One task per node
             (all of its GPUs) or one per GPU are both handled (`slurm_local_device_ids`).
  tpu        a Cloud TPU VM (chips on the PCI bus) or a GKE TPU pod (TPU_WORKER_HOSTNAMES,
             MEGASCALE_COORDINATOR_ADDRESS); JAX reads the worker list from the TPU metadata.
             Initialised on single-host TPU VMs too (as MaxText does): it costs a second and
             keeps multi-host checkpointing paths the same everywhere.
On CPU, cross-process collectives use gloo. After start-up only process 0 logs at INFO level.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
from absl import logging

from parallel.platforms import gpu_attached, tpu_chips_attached

_INITIALIZED = False


def _platforms(env: Mapping[str, str]) -> set[str]:
  return {p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()}


def multihost_environment(env: Mapping[str, str] | None = None,
                          tpu_chips: int | None = None) -> str | None:
  """Names the multi-host environment ('explicit', 'slurm', 'tpu'), or None for one process."""
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
    return "explicit"
  slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in env for v in slurm_vars) and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  platforms = _platforms(env)
  if platforms and "tpu" not in platforms:
    return None  # e.g. JAX_PLATFORMS=cpu on a TPU VM: tests, compile checks
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if (tpu_chips_attached() if tpu_chips is None else tpu_chips) > 0:
    return "tpu"
  return None


def _count_list(value: str) -> int:
  return len([v for v in value.split(",") if v.strip()])


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
  """Which local GPUs this SLURM task drives, or None to let JAX choose ([SLURM_LOCALID]).

  JAX assumes one task per GPU and gives task i of a node GPU i. With one task per node that
  would leave all but GPU 0 idle, so the task gets every GPU it can see; a task bound to a
  single GPU by SLURM (`--gpus-per-task=1`) sees it as device 0.
  """
  nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
  tasks_per_node = int(env["SLURM_NTASKS"]) // max(nodes, 1)
  visible = env.get("CUDA_VISIBLE_DEVICES", "")
  if tasks_per_node == 1:
    gpus = _count_list(visible) if visible else int(
        re.match(r"\d*", env.get("SLURM_GPUS_ON_NODE", "")).group() or 0)
    return list(range(gpus)) if gpus else None
  if visible and _count_list(visible) == 1:
    return [0]
  return None


def initialize_arguments(kind: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Keyword arguments of `jax.distributed.initialize` for environment `kind`."""
  env = os.environ if env is None else env
  if kind == "explicit":
    args: dict[str, Any] = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                num_processes=int(env["JAX_NUM_PROCESSES"]),
                                process_id=int(env["JAX_PROCESS_ID"]))
    if env.get("JAX_LOCAL_DEVICE_IDS"):
      args["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    return args
  if kind == "slurm":
    ids = slurm_local_device_ids(env)
    return {} if ids is None else {"local_device_ids": ids}
  if kind == "tpu":
    return {}  # JAX reads the worker list and this worker's id from the TPU metadata
  raise ValueError(f"unknown multi-host environment {kind!r}")


def _uses_cpu_collectives(kind: str, env: Mapping[str, str]) -> bool:
  platforms = _platforms(env)
  if platforms:
    return platforms == {"cpu"}
  return kind != "tpu" and not gpu_attached()


def maybe_initialize_distributed() -> str | None:
  """Calls `jax.distributed.initialize` once if this is one process of a multi-host job.

  Must run before anything starts a JAX backend (`jax.devices()`, the first jit).

  Returns:
    The environment's kind, or None for a single-process run.
  """
  global _INITIALIZED
  kind = multihost_environment()
  if kind is None:
    return None
  if _INITIALIZED:
    return kind
  if _uses_cpu_collectives(kind, os.environ):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**initialize_arguments(kind))
  _INITIALIZED = True
  logging.info("jax.distributed initialised (%s): process %d of %d, %d of %d devices local",
               kind, jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  if jax.process_index() != 0:
    # One log for the job: the other processes report only warnings and errors.
    logging.set_verbosity(logging.WARNING)
  return kind
