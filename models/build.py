"""The functional boundary between NNX modules and jitted steps.

`ModelSpec` holds a model's graph definition and abstract parameters. Params cross the jit
boundary as plain nested dicts of arrays (what orbax saves and `jax.jit` shards); inside a step
`spec.bind(params)` merges them back into a module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from models.decoder import Decoder
from models.encoder import Encoder
from models.heads import EncoderClassifier, RewardModel, SequenceClassifier

Params = dict[str, Any]

# Model kinds (configs/run_layout.py MODEL_KINDS: what a run's checkpoints hold) -> modules.
MODEL_CLASSES: dict[str, Callable[..., nnx.Module]] = {
    "decoder": Decoder, "encoder": Encoder, "reward": RewardModel,
    "classifier": SequenceClassifier, "encoder_classifier": EncoderClassifier}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  config: ml_collections.ConfigDict
  graphdef: Any
  shapes: Params          # pure dict of jax.ShapeDtypeStruct
  logical_axes: Params    # pure dict of tuples of logical axis names
  make: Callable[[nnx.Rngs], nnx.Module]

  def init(self, rng: jax.Array) -> Params:
    """Fresh params from `rng`; jit this with `out_shardings` so nothing is made unsharded."""
    return nnx.to_pure_dict(nnx.split(self.make(nnx.Rngs(params=rng)))[1])

  def bind(self, params: Params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)


def build_model_spec(cfg: ml_collections.ConfigDict, kind: str = "decoder") -> ModelSpec:
  """Traces the model's construction abstractly: shapes and logical axes, no memory used."""
  if kind not in MODEL_CLASSES:
    raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODEL_CLASSES)}")
  cls = MODEL_CLASSES[kind]
  return spec_of(cfg, lambda rngs: cls(cfg, rngs=rngs))


def spec_of(cfg: ml_collections.ConfigDict, make: Callable[[nnx.Rngs], nnx.Module]) -> ModelSpec:
  """The ModelSpec of any module `make(rngs)` builds (e.g. training/rl/policy.py's
  ActorCritic), traced abstractly."""
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(params=0)))
  graphdef, state = nnx.split(abstract)
  shapes = nnx.to_pure_dict(state)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  logical_axes = jax.tree.map(lambda spec, shape: tuple(spec) if spec is not None
                              else (None,) * len(shape.shape), specs, shapes,
                              is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return ModelSpec(config=cfg, graphdef=graphdef, shapes=shapes, logical_axes=logical_axes,
                   make=make)


def count_params(shapes: Params, *, exclude_embedding: bool = False) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(shapes)
  total = 0
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    if exclude_embedding and ("'embed']" in name and "blocks" not in name):
      continue
    total += int(leaf.size) if hasattr(leaf, "size") else int(jax.numpy.size(leaf))
  return total
