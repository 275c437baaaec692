"""Which compiled programs a stage runs, built from shapes only (nothing is read or run).

scripts/compile_check.py compiles these for a TPU pod and reports each one's memory, FLOPs
and collectives. Every program is the very jitted function training runs, lowered from
sharded `jax.ShapeDtypeStruct`s:

    supervised stages (training/loop.py)
      train_step       training/setup.py's step over `Stage.abstract_batch`, frozen models
                       (reference, teacher, LoRA base) as arguments
      reference_pass   DPO / KTO with cached reference log-probs: the reference over the data
                       before training (training/stages/reference_cache.py), alone in memory
    RL stages (training/rl/loop.py: sample, score, update)
      sample           models/sampler.py: prefill and the KV-cached decode loop, one program,
                       for the whole rollout (prompts_per_iteration x samples_per_prompt rows)
      reward_model     the reward model's score of every rollout row (config.reward.model)
      log_probs        policy (+ values) and reference log-probs of one minibatch of rows
      update           the train step over one minibatch (`Stage.abstract_batch`)

Memory: the params of every model (and the optimizer state) stay on the devices for the
whole run while the programs run one after another, so a program's honest peak is its own
compiled footprint plus the *resident* buffers it does not take as arguments (`resident`
minus `uses`): the sampler runs beside the optimizer state, the reference and the reward
model. The one exception is the cached-reference pass, which runs before the train state
exists.

Model FLOPs follow models/flops.py (the benchmark's count: 6 N per trained token plus causal
attention, 2 N per forward token). `counted_flops` counts them as XLA's cost analysis counts
the compiled program: a `while` body once, so a scanned layer stack as one layer, a
gradient-accumulation scan as one micro-batch and a decode loop as one step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.models import model_config
from configs.run_layout import read_run_config
from data.verifiers import get_answer_checker, get_reward_function
from models.build import build_model_spec, count_params
from models.flops import forward_flops_per_token
from parallel.host_data import batch_shards
from parallel.rules import batch_sharding
from training.registry import get_stage
from training.rl.algorithms import get_algorithm
from training.rl.policy import build_actor_critic_spec
from training.rl.rewards import RewardModelScorer
from training.rl.rollout import RolloutEngine
from training.rl.stages import on_policy_update
from training.runs import sharded_target
from training.setup import build_setup
from training.stage import FrozenModel, Stage
from training.stages.reference_cache import make_pair_log_probs_fn

REWARD_MODEL = "reward_model"   # the RL reward model's name among frozen-model presets


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program of a stage (module docstring)."""
  name: str
  what: str                       # what it computes, at which shapes (one line)
  lower: Callable[[], Any]        # -> jax.stages.Lowered
  uses: tuple[str, ...]           # resident buffers among its arguments
  resident: tuple[str, ...]       # resident buffers while it runs
  model_flops: int                # global, per run of the program
  counted_flops: int              # the same, a loop body once


@dataclasses.dataclass(frozen=True)
class StagePrograms:
  """The programs of one stage config on one mesh, and its resident buffers by name."""
  stage: str
  mesh: jax.sharding.Mesh
  batch_shards: int               # ways the batch splits over the mesh
  params: int                     # trained model's params
  resident: dict[str, Any]        # name -> pytree of sharded ShapeDtypeStructs
  programs: list[Program]
  logical_axes: Any               # of the trained params (`--print_layout`)

  def resident_bytes(self, name: str) -> int:
    """Bytes of one device's shards of resident buffer `name`."""
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
               for a in jax.tree.leaves(self.resident[name]))


class StopIdsOnly:
  """The token ids the rollout engine reads (padding, EOS, the chat template's closing
  symbol) when nothing is decoded: a compile needs ids, not a tokenizer. -1 is never emitted."""
  pad_id, eos_id, unk_id = 0, -1, -2

  def token_to_id(self, piece: str) -> int:
    del piece
    return self.eos_id

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Templates that close a turn with a symbol plus text (chatml's `<|im_end|>` + newline)."""
    del add_bos, add_eos
    return [self.eos_id] * len(text)


def is_rl(config: ml_collections.ConfigDict) -> bool:
  return get_stage(config.objective.name).train is not None


def batch_knob(config: ml_collections.ConfigDict) -> str:
  """The config field that sets a stage's batch (what `--find_batch` searches)."""
  return "rl.prompts_per_iteration" if is_rl(config) else "data.global_batch_size"


def batch_unit(config: ml_collections.ConfigDict, shards: int) -> int:
  """The smallest step of `batch_knob` that keeps every batch whole on `shards` ways: the
  global batch (and each micro-batch), or the rollout and each RL minibatch."""
  if not is_rl(config):
    return shards * config.train.grad_accum_steps
  rl = config.rl
  per_unit = rl.samples_per_prompt if get_algorithm(config.objective.name).units == "rows" else 1
  unit = 1
  while (unit * per_unit) % (rl.minibatches * shards) or (unit * rl.samples_per_prompt) % shards:
    unit += 1
  return unit


def _sharded(tree: dict[str, jax.ShapeDtypeStruct], mesh, rules) -> dict[str, Any]:
  return {k: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                  sharding=batch_sharding(mesh, rules, ndim=len(a.shape)))
          for k, a in tree.items()}


def _layers_once(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cfg` with its layer stack as the cost analysis counts it (a scanned stack: one layer)."""
  return cfg if not cfg.scan_layers else ml_collections.ConfigDict(dict(cfg, num_layers=1))


def _head(cfg, kind: str) -> int:
  """Forward FLOPs per token of the output head (a scalar head: negligible)."""
  return 2 * cfg.d_model * cfg.vocab_size if kind in ("decoder", "encoder") else 0


def _forward(cfg, kind: str, length: int) -> int:
  """Forward FLOPs per token of a model of `kind` on rows of `length` tokens."""
  return forward_flops_per_token(cfg, length) - 2 * cfg.d_model * cfg.vocab_size + _head(
      cfg, kind)


def _both(fn: Callable[[Callable], int]) -> tuple[int, int]:
  """(fn(identity), fn(_layers_once)): model FLOPs as executed and as counted."""
  return fn(lambda cfg: cfg), fn(_layers_once)


def preset_model(name: str, like: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """configs/models.py preset `name`, computing in `like`'s dtype with its remat and scan."""
  cfg = model_config(name)
  cfg.update({k: like[k] for k in ("dtype", "param_dtype", "remat", "scan_layers")})
  return cfg


def _frozen_models(stage: Stage, config, presets: dict[str, str]) -> dict[str, FrozenModel]:
  """The stage's frozen models, those named in `presets` with that model preset (no run read)."""
  try:
    models = dict(stage.frozen_models(config))
  except FileNotFoundError:
    if not [n for n in presets if n != REWARD_MODEL]:
      raise
    models = {}
  for name, preset in presets.items():
    if name != REWARD_MODEL:
      old = models.get(name, FrozenModel(config.model, ""))
      models[name] = FrozenModel(preset_model(preset, config.model), old.path, old.kind)
  return models


def stage_programs(config: ml_collections.ConfigDict, devices=None,
                   presets: dict[str, str] | None = None) -> StagePrograms:
  """The programs of `config`'s stage on `devices` (default: this machine's); `presets` maps
  frozen models ('teacher', 'reference', 'reward_model') to configs/models.py presets, for
  runs that do not exist here."""
  presets = dict(presets or {})
  if is_rl(config):
    return _rl_programs(config, devices, presets)
  return _supervised_programs(config, devices, presets)


def _supervised_programs(config, devices, presets) -> StagePrograms:
  stage = get_stage(config.objective.name)
  models = _frozen_models(stage, config, presets)
  stage = dataclasses.replace(stage, frozen_models=lambda c: models)
  setup = build_setup(config, stage, devices=devices)
  mesh, rules = setup.mesh, setup.rules
  frozen = setup.load_frozen(abstract=True)
  state = setup.abstract_state
  resident = {"params": state["params"],
              "optimizer": {k: v for k, v in state.items() if k != "params"},
              **frozen.params}
  batch = _sharded(stage.abstract_batch(config), mesh, rules)
  b, length = config.data.global_batch_size, config.data.seq_len
  micro = config.train.grad_accum_steps

  def train_flops(counted: bool) -> int:
    layers = _layers_once if counted else (lambda cfg: cfg)
    per_token = 3 * _forward(layers(config.model), stage.model_kind, length)
    per_token += sum(_forward(layers(m.model_config), m.kind, length) for m in models.values())
    return per_token * b * length // (micro if counted else 1)

  step = setup.train_step(frozen)
  frozen_text = "".join(f" + frozen {n}" for n in frozen.params)
  programs = [Program(
      "train_step", f"{stage.name} train step, {b} x {length} tokens{frozen_text}"
      + (f", {micro} micro-batches" if micro > 1 else ""),
      lambda: step.lower(state, batch, frozen.params), uses=tuple(resident),
      resident=tuple(resident), model_flops=train_flops(False),
      counted_flops=train_flops(True))]
  if "reference_logps" in batch:
    spec = build_model_spec(config.model, "decoder")
    resident["reference"] = sharded_target(spec.shapes, spec.logical_axes, mesh, rules)
    forward = make_pair_log_probs_fn(spec, mesh, rules)
    rows = {k: v for k, v in batch.items() if k != "reference_logps"}
    flops = _both(lambda layers: b * length * _forward(layers(config.model), "decoder", length))
    programs.append(Program(
        "reference_pass", f"cached reference log-probs before training, {b} x {length} tokens",
        lambda: forward.lower(resident["reference"], rows), uses=("reference",),
        resident=("reference",), model_flops=flops[0], counted_flops=flops[1]))
  return StagePrograms(stage.name, mesh, batch_shards(mesh, rules), count_params(
      setup.base_spec.shapes), resident, programs, setup.spec.logical_axes)


def _reward_model_config(config, presets) -> ml_collections.ConfigDict:
  if REWARD_MODEL in presets:
    return preset_model(presets[REWARD_MODEL], config.model)
  try:
    return read_run_config(config.reward.model).model
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}: no reward-model run to read its shapes from; name its model "
                            f"preset instead (--frozen {REWARD_MODEL}=1b)") from None


def _rl_programs(config, devices, presets) -> StagePrograms:
  """As training/rl/loop.py's RLTrainer builds them, every model as sharded shapes."""
  algorithm = get_algorithm(config.objective.name)
  rl = config.rl
  spec = build_actor_critic_spec(config.model, algorithm.value_source(config))
  stage = get_stage(config.objective.name)
  setup = build_setup(config, stage, devices=devices, spec=spec,
                      total_updates=config.train.steps * rl.epochs * rl.minibatches)
  mesh, rules, state = setup.mesh, setup.rules, setup.abstract_state
  ref_spec = build_model_spec(config.model, "decoder")
  resident = {"params": state["params"],
              "optimizer": {k: v for k, v in state.items() if k != "params"},
              "reference": sharded_target(ref_spec.shapes, ref_spec.logical_axes, mesh, rules)}
  scorer, rm_cfg = None, None
  if config.reward.model:
    rm_cfg = _reward_model_config(config, presets)
    rm_spec = build_model_spec(rm_cfg, "reward")
    resident[REWARD_MODEL] = sharded_target(rm_spec.shapes, rm_spec.logical_axes, mesh, rules)
    scorer = RewardModelScorer(rm_spec, resident[REWARD_MODEL], mesh, rules)
  checker = get_answer_checker(config.data.answer_checker)
  engine = RolloutEngine(config, spec, StopIdsOnly(), mesh, rules, ref_spec=ref_spec,
                         ref_params=resident["reference"],
                         reward_fn=get_reward_function(config.reward.function, checker),
                         reward_model=scorer, answer_check=checker)
  rows = rl.prompts_per_iteration * rl.samples_per_prompt
  p, t = rl.max_prompt_len, rl.max_new_tokens
  length, chunk = p + t, rows // rl.minibatches
  everything = tuple(resident)
  shaped = lambda fields: _sharded({k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in
                                    fields.items()}, mesh, rules)
  prompts = shaped({"tokens": ((rows, p), jnp.int32), "lengths": ((rows,), jnp.int32)})
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  values = algorithm.value_source(config)
  critic = values == "model"
  values = values != "none"

  def policy_forward(cfg, n):  # one pass of the trained model over n rows (ppo_flops)
    trunk = _forward(cfg, "reward", length)
    return n * ((length - 1) * trunk * (2 if critic else 1) + t * _head(cfg, "decoder"))

  def sample_flops(cfg, new_tokens):  # scripts/benchmarks/generation.py generation_flops
    head = _head(cfg, "decoder")
    prefill = p * (forward_flops_per_token(cfg, p) - head) + head
    return rows * (prefill + (new_tokens - 1) * forward_flops_per_token(cfg, 2 * p + new_tokens))

  sample = engine._sample  # pylint: disable=protected-access  (the rollout's own sampler)
  programs = [Program(
      "sample", f"prefill + KV-cached decode loop, {rows} rows x ({p} prompt + {t} new) tokens",
      lambda: sample.lower(state["params"], prompts["tokens"], prompts["lengths"], key),
      uses=("params",), resident=everything, model_flops=sample_flops(config.model, t),
      counted_flops=sample_flops(_layers_once(config.model), 2))]
  if scorer is not None:
    scored = shaped({"tokens": ((rows, length), jnp.int32),
                     "positions": ((rows, length), jnp.int32),
                     "segment_ids": ((rows, length), jnp.int32), "last": ((rows,), jnp.int32)})
    flops = _both(lambda layers: rows * length * _forward(layers(rm_cfg), "reward", length))
    programs.append(Program(
        REWARD_MODEL, f"reward-model scores of {rows} rows x {length} tokens",
        lambda: scorer._score.lower(resident[REWARD_MODEL], scored),  # pylint: disable=protected-access
        uses=(REWARD_MODEL,), resident=everything, model_flops=flops[0], counted_flops=flops[1]))
  policy = not on_policy_update(config)
  forward = engine._forward[policy]  # pylint: disable=protected-access
  chunk_rows = shaped({"tokens": ((chunk, length), jnp.int32),
                       "positions": ((chunk, length), jnp.int32),
                       "segment_ids": ((chunk, length), jnp.int32),
                       "mask": ((chunk, t), jnp.float32)})
  flops = _both(lambda layers: policy * policy_forward(layers(config.model), chunk) + chunk * (
      (length - 1) * _forward(layers(config.model), "reward", length)
      + t * _head(config.model, "decoder")))
  programs.append(Program(
      "log_probs", ("policy" + (" + values" if values else "") + " and " if policy else "")
      + f"reference log-probs of {chunk} rows x {length} tokens",
      lambda: forward.lower(state["params"], resident["reference"], chunk_rows),
      uses=("params", "reference"), resident=everything, model_flops=flops[0],
      counted_flops=flops[1]))
  minibatch = _sharded(stage.abstract_batch(config), mesh, rules)
  update_rows = next(iter(minibatch.values())).shape[0] * (2 if algorithm.units == "pairs"
                                                            else 1)
  step = setup.train_step()
  flops = _both(lambda layers: 3 * policy_forward(layers(config.model), update_rows))
  programs.append(Program(
      "update", f"{stage.name} train step over {update_rows} rows x {length} tokens",
      lambda: step.lower(state, minibatch), uses=("params", "optimizer"), resident=everything,
      model_flops=flops[0], counted_flops=flops[1]))
  return StagePrograms(stage.name, mesh, batch_shards(mesh, rules),
                       count_params(setup.base_spec.shapes), resident, programs,
                       setup.spec.logical_axes)
