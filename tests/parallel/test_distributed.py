"""Multi-host detection and `jax.distributed.initialize` arguments, from environments alone."""

import pytest

from parallel.distributed import (initialize_arguments, multihost_environment,
                                  slurm_local_device_ids)

SLURM = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[001-002]", SLURM_PROCID="3",
             SLURM_LOCALID="1", SLURM_STEP_NUM_NODES="2")


@pytest.mark.parametrize("env, chips, want", [
    ({}, 0, None),
    (dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1234", JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID="1"), 0, "explicit"),
    (dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1234", JAX_NUM_PROCESSES="1"), 0, None),
    (dict(SLURM, SLURM_NTASKS="4"), 0, "slurm"),
    (dict(SLURM, SLURM_NTASKS="1"), 0, None),
    # salloc shell without srun: no step, so no multi-process job yet.
    ({k: v for k, v in dict(SLURM, SLURM_NTASKS="4").items()
      if k != "SLURM_STEP_NODELIST"}, 0, None),
    (dict(TPU_WORKER_HOSTNAMES="10.0.0.2,10.0.0.3"), 0, "tpu"),
    (dict(TPU_WORKER_HOSTNAMES="localhost"), 0, None),
    (dict(MEGASCALE_COORDINATOR_ADDRESS="10.0.0.2"), 0, "tpu"),
    ({}, 4, "tpu"),                                   # a Cloud TPU VM
    (dict(JAX_PLATFORMS="cpu"), 4, None),             # tests on a TPU VM stay single-process
])
def test_multihost_environment(env, chips, want):
  assert multihost_environment(env, tpu_chips=chips) == want


def test_explicit_arguments():
  env = dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1234", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID="1", JAX_LOCAL_DEVICE_IDS="0,1")
  assert initialize_arguments("explicit", env) == dict(
      coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
      local_device_ids=[0, 1])


@pytest.mark.parametrize("extra, want", [
    # One task per GPU, each seeing all 8: JAX gives task i GPU i.
    (dict(SLURM_NTASKS="16"), None),
    # One task per GPU bound by --gpus-per-task=1: the task's one GPU is device 0.
    (dict(SLURM_NTASKS="16", CUDA_VISIBLE_DEVICES="5"), [0]),
    # One task per node: all of the node's GPUs, not just GPU 0.
    (dict(SLURM_NTASKS="2", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), list(range(8))),
    (dict(SLURM_NTASKS="2", SLURM_GPUS_ON_NODE="4"), [0, 1, 2, 3]),
    (dict(SLURM_NTASKS="2"), None),  # CPU nodes
])
def test_slurm_local_device_ids(extra, want):
  env = dict(SLURM, **extra)
  assert slurm_local_device_ids(env) == want
  assert initialize_arguments("slurm", env) == ({} if want is None else
                                                {"local_device_ids": want})


def test_tpu_arguments_come_from_jax():
  assert initialize_arguments("tpu", {}) == {}
  with pytest.raises(ValueError, match="unknown multi-host environment"):
    initialize_arguments("mpi", {})
