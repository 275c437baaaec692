"""Mesh shapes from config.mesh: -1 fills, ICI x DCN, errors that say what to change."""

import jax
import ml_collections
import numpy as np
import pytest

from parallel.mesh import make_mesh, mesh_shape


def mesh_config(**sizes):
  config = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                          dcn_tensor=1, rules="fsdp_tp"))
  config.update(sizes)
  return config


@pytest.mark.parametrize("sizes, devices, slices, want_ici, want_dcn", [
    (dict(), 8, 1, [8, 1, 1], [1, 1, 1]),
    (dict(data=1, fsdp=-1, tensor=2), 8, 1, [1, 4, 2], [1, 1, 1]),
    (dict(data=2, fsdp=2, tensor=2), 8, 1, [2, 2, 2], [1, 1, 1]),
    (dict(data=1, fsdp=-1, dcn_data=-1), 512, 2, [1, 256, 1], [2, 1, 1]),
    (dict(data=1, fsdp=64, tensor=4, dcn_data=2, dcn_fsdp=2), 1024, 4, [1, 64, 4], [2, 2, 1]),
])
def test_mesh_shape(sizes, devices, slices, want_ici, want_dcn):
  assert mesh_shape(mesh_config(**sizes), devices, slices) == (want_ici, want_dcn)


def test_mesh_shape_errors():
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    mesh_shape(mesh_config(fsdp=-1), 8)
  with pytest.raises(ValueError, match="8 devices do not divide by the fixed axes"):
    mesh_shape(mesh_config(fsdp=3), 8)
  with pytest.raises(ValueError, match=r"need 4 devices, have 8"):
    mesh_shape(mesh_config(data=2, fsdp=2), 8)
  with pytest.raises(ValueError, match=r"2 slices; e.g. set dcn_data=2"):
    mesh_shape(mesh_config(), 512, num_slices=2)


def test_make_mesh_on_fake_cpu_devices():
  mesh = make_mesh(mesh_config(data=1, fsdp=4, tensor=2), jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  # CPU devices have no topology: id order, so tensor pairs are neighbours (0,1), (2,3), ...
  np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(mesh.devices)[0],
                                [[0, 1], [2, 3], [4, 5], [6, 7]])
  assert dict(make_mesh(mesh_config(), jax.devices()[:1]).shape) == {
      "data": 1, "fsdp": 1, "tensor": 1}
