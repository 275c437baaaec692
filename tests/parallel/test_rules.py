"""Logical-axis rules: presets cover every name, nothing unnamed or unruled is replicated
silently, and the tiny config's parameter layout matches the checked-in golden file."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import models  # noqa: F401
from configs import pretrain
from models.build import build_model_spec
from parallel.mesh import make_mesh
from parallel.rules import (ACTIVATION_AXES, PARAM_AXES, RULE_PRESETS, constrain,
                            describe_layout, get_rules, logical_to_spec, tree_shardings,
                            use_mesh_rules)
from training.optimizer import make_optimizer
from training.state import abstract_train_state

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_fsdp_tp_layout.txt")


def _mesh(data=2, fsdp=2, tensor=2):
  return Mesh(np.array(jax.devices()[:data * fsdp * tensor]).reshape(data, fsdp, tensor),
              ("data", "fsdp", "tensor"))


def test_every_preset_maps_every_logical_name():
  for name, rules in RULE_PRESETS.items():
    assert set(PARAM_AXES) | set(ACTIVATION_AXES) <= set(rules), name


def test_model_uses_only_documented_names():
  spec = build_model_spec(pretrain.get_config("tiny").model)
  is_names = lambda x: isinstance(x, tuple)
  used = {n for names in jax.tree.leaves(spec.logical_axes, is_leaf=is_names) for n in names}
  assert used == {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm"}


def test_preset_specs():
  mesh = _mesh()
  names = ("embed", "mlp")
  assert logical_to_spec(names, get_rules("dp"), mesh=mesh) == P(None, None)
  assert logical_to_spec(names, get_rules("fsdp"), mesh=mesh) == P("fsdp", None)
  assert logical_to_spec(names, get_rules("fsdp_tp"), mesh=mesh) == P("fsdp", "tensor")
  assert logical_to_spec(("batch", "length"), get_rules("dp"), mesh=mesh) == \
      P(("data", "fsdp", "tensor"), None)
  assert logical_to_spec(("batch", "length"), get_rules("fsdp_tp"), mesh=mesh) == \
      P(("data", "fsdp"), None)
  # Mesh axes of size 1 are dropped: on (1, 8, 1) the batch is split over fsdp alone.
  assert logical_to_spec(("batch",), get_rules("fsdp_tp"), mesh=_mesh(1, 8, 1)) == P("fsdp")


def test_unruled_parameter_is_an_error_naming_its_path():
  rules = get_rules("fsdp_tp")
  del rules["mlp"]
  shapes = {"blocks": {"up": jax.ShapeDtypeStruct((8, 16), jnp.float32)}}
  with pytest.raises(KeyError, match=r"'mlp' of parameter \['blocks'\]\['up'\]"):
    tree_shardings({"blocks": {"up": ("embed", "mlp")}}, shapes, _mesh(), rules)


def test_unnamed_parameter_dimension_is_an_error():
  shapes = {"head": {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}}
  with pytest.raises(ValueError, match=r"\['head'\]\['w'\] \(8, 16\) has no logical axis name"):
    tree_shardings({"head": {"w": ("embed", None)}}, shapes, _mesh(), get_rules("dp"))


def test_indivisible_dimension_is_an_error():
  shapes = {"q": jax.ShapeDtypeStruct((6, 16), jnp.float32)}
  with pytest.raises(ValueError, match=r"dimension 0 \('embed', size 6\) does not divide"):
    tree_shardings({"q": ("embed", "heads")}, shapes, _mesh(1, 4, 2), get_rules("fsdp_tp"))


def test_unruled_activation_is_an_error_naming_where():
  with pytest.raises(KeyError, match=r"'act_new' of activation \(4, 8\).*test_rules.py:\d+"):
    with use_mesh_rules(_mesh(), get_rules("fsdp_tp")):
      jax.jit(lambda x: constrain(x, ("batch", "act_new")))(jnp.ones((4, 8)))


def test_constrain_is_identity_outside_the_rules_context():
  x = jnp.arange(6.0)
  assert constrain(x, ("act_new",)) is x


def _tiny_layout():
  config = pretrain.get_config("tiny")
  config.mesh.update(dict(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
  spec = build_model_spec(config.model)
  optimizer, _ = make_optimizer(config.optimizer, 10)
  mesh = make_mesh(config.mesh, jax.devices()[:8])
  state = abstract_train_state(spec, optimizer, mesh, get_rules(config.mesh.rules))
  header = ("# configs/pretrain.py:tiny parameters on mesh data=2 fsdp=2 tensor=2, rules "
            "fsdp_tp\n# path, shape, dtype, logical axes, partition spec (* = whole), "
            "per-device shard\n")
  return header + describe_layout(spec.logical_axes, state["params"]), state


def test_tiny_layout_matches_golden():
  layout, state = _tiny_layout()
  if os.environ.get("UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      f.write(layout)
  with open(GOLDEN) as f:
    assert layout == f.read(), "layout changed; rerun with UPDATE_GOLDEN=1 and review the diff"
  # Adam's moments are laid out exactly like the parameters they track.
  adam = state["opt_state"][1][0]
  params_specs = jax.tree.map(lambda a: a.sharding.spec, state["params"])
  assert jax.tree.map(lambda a: a.sharding.spec, adam.mu) == params_specs
  assert jax.tree.map(lambda a: a.sharding.spec, adam.nu) == params_specs
  assert state["params"]["blocks"]["layers"]["mlp"]["up"].sharding.spec == \
      P(None, "fsdp", "tensor")
