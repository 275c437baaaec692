"""Off-policy, overlapped rollouts: iteration t + k is sampled with the weights of iteration t.

Generation dominates an RL iteration, and in the synchronous loop the training devices wait
for it and the sampler waits for the update. With `config.rl.staleness` k >= 1 the two
overlap. theta_t are the params at the start of iteration t; the rollout iteration t trains
on is sampled with theta_b, b = max(t - k, 0) (`behaviour_iteration`):

    iteration t:  collect rollout t (sampled with theta_{t-k}, dispatched k iterations ago)
                  copy theta_t to the rollout devices, dispatch the sampling of rollout t + k
                  score rollout t, pi_old and pi_ref passes, the update      -> theta_{t+1}
                  ... while the rollout devices generate rollout t + k

The first k + 1 rollouts are sampled with theta_0. With k = 0 this object samples each
iteration's rollout with its own weights, exactly as the synchronous loop (the same sampler
program, prompts and keys; training/rl/loop.py uses it then only when rollouts have their
own devices).

Devices (`config.rl.rollout_devices` r >= 1): the first r devices form the rollout mesh,
data-parallel replicas of the policy (data r / tensor x tensor `config.mesh.tensor`, no
fsdp: decoding reads every weight every step), the others the training mesh of
`config.mesh`. JAX dispatch is asynchronous: the weights' copy and the sampling of t + k are
queued on the rollout devices before the training devices start the update of t, which
runs meanwhile; the copy is made before the update donates the train state. r = 0: rollouts
and updates share the training mesh (the same schedule and losses, no overlap).

Correction (k >= 1): the tokens come from mu = pi_{theta_b}, not from pi_old = pi_{theta_t}.
Right after a rollout's samples are collected its behaviour log-probs log mu are computed on
the rollout devices with the weights that sampled it, by the training forward pass
(training/rl/policy.py, the code of pi_old's pass: equal weights give equal log-probs, so the
weight is 1 up to float rounding, and tool episodes, whose sampler gives no log-probs, are
covered). pi_old's pass (RolloutEngine.complete) always runs, and each token's policy loss is
weighted by w = min(pi_old / mu, C), C = `config.rl.max_importance_ratio`: truncated
importance sampling (objectives/ppo.py `truncated_weights`, objectives/grpo.py). Online DPO
(preference pairs) is trained on the stale pairs as they are.

Int8 rollouts (`config.rl.rollout_weights` "int8", models/quantize.py): the sampler reads
weight-only int8 matrices, so mu is the quantized policy even at k = 0, and its log-probs
come from the same forward pass on the same quantized weights (`sampling_params`); the
correction is the same (the rollout mismatch between a fast sampler and the trained model that
truncated importance sampling was proposed for, Yao et al., 2025). It costs that forward pass
per iteration; at k = 0 it runs on the training mesh right after the sampling.

Figures (train/*): staleness (t - b), importance_weight (mean w per reply token),
importance_truncated (the share of tokens where the cap binds), behaviour_kl (per reply, the
k1 estimate of KL(mu || pi_old), sum_t log mu - log pi_old, on mu's samples).

Resume: a checkpoint taken before iteration s holds the behaviour weights of the rollouts in
flight, theta_b(j) for j = s .. s + k - 1 (`in_flight_params`, saved beside the train state:
at most k copies of the params, no optimizer state). On resume those rollouts are
*regenerated* from them with their own prompts and sampling keys (pure functions of seed,
iteration and round), so the resumed run equals the uninterrupted one; the rollouts
themselves (text, variable shapes) are never saved.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data.prompts import PromptItem
from models.sampler import sampling_params
from objectives.ppo import truncated_weights
from parallel.host_data import to_global, to_host
from parallel.mesh import make_mesh
from parallel.rules import Rules, tree_shardings, use_mesh_rules
from training.rl.policy import response_log_probs
from training.rl.rollout import PendingSample, Rollout, RolloutEngine

# (drawer with `.draw(params, items, rng)`, behaviour params, iteration)
#   -> (rollout not yet completed, seconds, figures): the trainer's draw of an iteration.
DrawIteration = Callable[[Any, Any, int], tuple[Rollout, dict[str, float], dict[str, float]]]
# iteration -> (its round-0 prompts, repeated G times, and sampling key)
FirstRound = Callable[[int], tuple[Sequence[PromptItem], jax.Array]]


def split_devices(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None
                  ) -> tuple[list[Any], jax.sharding.Mesh | None]:
  """(the training mesh's devices, the rollout mesh or None) of `config.rl.rollout_devices`.

  Raises:
    ValueError: naming `config.rl.rollout_devices` when it leaves no training device or does
      not divide by `config.mesh.tensor`.
  """
  devices = list(jax.devices() if devices is None else devices)
  r = config.rl.rollout_devices
  if r <= 0:
    return devices, None
  if r >= len(devices):
    raise ValueError(f"config.rl.rollout_devices {r} leaves none of the {len(devices)} "
                     "devices to train on")
  tensor = max(config.mesh.tensor, 1)
  if r % tensor:
    raise ValueError(f"config.rl.rollout_devices {r} is not a multiple of config.mesh.tensor "
                     f"{tensor} (each rollout replica is tensor-parallel like training)")
  mesh_config = ml_collections.ConfigDict(dict(
      config.mesh.to_dict(), data=-1, fsdp=1, tensor=tensor, dcn_data=1, dcn_fsdp=1,
      dcn_tensor=1))
  return devices[r:], make_mesh(mesh_config, devices[:r])


def behaviour_iteration(iteration: int, staleness: int) -> int:
  """b: the iteration whose weights sample iteration `iteration`'s rollout."""
  return max(iteration - staleness, 0)


def importance_arrays(rollout: Rollout, cap: float) -> tuple[dict[str, np.ndarray], dict]:
  """The TIS weights `[B, T]` of a stale rollout (module docstring) and their figures."""
  mask = rollout.mask
  weights, truncated = jax.device_get(truncated_weights(
      rollout.log_probs, rollout.behaviour_log_probs, mask, cap))
  tokens = max(float(mask.sum()), 1.0)
  figures = {"importance_truncated": float(truncated.sum()) / tokens,
             "behaviour_kl": float(((rollout.behaviour_log_probs - rollout.log_probs)
                                    * mask).sum(-1).mean())}
  return {"importance_weights": np.asarray(weights, np.float32)}, figures


@dataclasses.dataclass
class _InFlight:
  params: Any              # theta_b on the rollout mesh
  behaviour: int           # b
  first: PendingSample     # round 0's sampler call, dispatched


class _Drawer:
  """`draw(params, items, rng)` on the rollout devices, for the trainer's draw (and dynamic
  sampling's rounds): round 0 is the sampler call dispatched earlier, later rounds sample
  there when asked."""

  def __init__(self, engine: RolloutEngine, sample_fn, mesh, first: PendingSample):
    self.engine, self.sample_fn, self.mesh, self.first = engine, sample_fn, mesh, first

  def draw(self, params, items: Sequence[PromptItem], rng: jax.Array):
    pending, self.first = self.first, None
    if pending is not None:
      return self.engine.finish_draw(pending)
    start = time.perf_counter()
    return self.engine.finish_draw(
        self.engine.start_sample(self.sample_fn, params, items, rng, mesh=self.mesh), start)


class StaleRollouts:
  """The rollouts of a run with `config.rl.staleness` k (module docstring): `next(t, params)`
  is iteration t's rollout; `in_flight_params` / `reset` carry them over a checkpoint."""

  def __init__(self, config: ml_collections.ConfigDict, engine: RolloutEngine, spec, rules: Rules,
               mesh: jax.sharding.Mesh | None, *, draw_iteration: DrawIteration,
               first_round: FirstRound):
    """`mesh`: the rollout mesh (None: the engine's, the training mesh)."""
    rl = config.rl
    self.staleness, self.steps, self.cap = rl.staleness, config.train.steps, \
        float(rl.max_importance_ratio)
    self.engine, self.rules = engine, rules
    self.mesh = engine.mesh if mesh is None else mesh
    self.draw_iteration, self.first_round = draw_iteration, first_round
    # On the training mesh the engine's own sampler (compiled once) serves.
    self.sample_fn = engine.rollout_sampler if mesh is None else engine.make_sampler(
        rl.max_new_tokens, mesh=mesh, temperature=rl.temperature, top_k=rl.top_k,
        top_p=rl.top_p, weights=engine.rollout_weights)
    self.param_shardings = tree_shardings(spec.logical_axes, spec.shapes, self.mesh, rules)
    self.abstract_params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), spec.shapes,
        self.param_shardings)
    self._own_devices = mesh is not None
    # The same mesh: a jitted copy (new buffers the update's donation cannot take away).
    self._copy_here = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                              out_shardings=self.param_shardings)
    replicated = NamedSharding(self.mesh, P())

    # mu's log-probs: the training forward pass on the weights as the sampler holds them
    # (int8 rollouts: quantized; else the compute dtype, exactly the params' own results).
    self.quantized = engine.rollout_weights != "compute"
    weights = engine.rollout_weights

    def behaviour(params, rows):
      with use_mesh_rules(self.mesh, rules):
        model = spec.bind(sampling_params(spec, params, weights))
        return response_log_probs(model, rows, rows["mask"].shape[1]) * rows["mask"]

    self._behaviour = jax.jit(behaviour, out_shardings=replicated)
    self.in_flight: dict[int, _InFlight] = {}
    self.restored: dict[int, Any] = {}

  def copy(self, params):
    """`params` (the train state's) as new arrays on the rollout mesh."""
    if self._own_devices:
      return jax.device_put(params, self.param_shardings)
    return self._copy_here(params)

  def in_flight_count(self, start: int) -> int:
    """Rollouts in flight before iteration `start`: k, fewer near the end of the run."""
    return max(min(self.staleness, self.steps - start), 0)

  def in_flight_params(self, start: int) -> dict[str, Any]:
    """The behaviour weights of the rollouts in flight before iteration `start` (dispatched
    by the iterations before it), `{str(j - start): params}`, for the checkpoint."""
    return {str(j - start): self.in_flight[j].params
            for j in range(start, start + self.in_flight_count(start))}

  def abstract_in_flight(self, start: int) -> dict[str, Any]:
    """`in_flight_params(start)`'s shapes and shardings, to restore a checkpoint."""
    return {str(i): self.abstract_params for i in range(self.in_flight_count(start))}

  def reset(self, start: int, restored: dict[str, Any] | None = None) -> None:
    """Forgets what is in flight; a run (re)starting at iteration `start` regenerates its
    first rollouts from `restored` (`in_flight_params(start)` of the checkpoint)."""
    self.in_flight = {}
    self.restored = {start + int(i): p for i, p in (restored or {}).items()}

  def _dispatch(self, j: int, params) -> None:
    items, rng = self.first_round(j)
    self.in_flight[j] = _InFlight(params, behaviour_iteration(j, self.staleness),
                                  self.engine.start_sample(self.sample_fn, params, items, rng,
                                                           mesh=self.mesh))

  def next(self, iteration: int, params) -> tuple[Rollout, dict[str, float], dict[str, float]]:
    """Iteration `iteration`'s rollout (not yet completed; with behaviour log-probs when
    stale), its seconds and figures; dispatches the rollouts sampled with `params`, the
    weights theta_t of this iteration, before returning."""
    t, k = iteration, self.staleness
    copies = []  # theta_t on the rollout mesh, copied once

    def weights_for(j: int):
      b = behaviour_iteration(j, k)
      if b == t:
        if not copies:
          copies.append(self.copy(params))
        return copies[0]
      if j in self.restored:
        return self.restored.pop(j)
      raise RuntimeError(f"iteration {j}'s rollout is not in flight and the weights of "
                         f"iteration {b} that sample it are gone (staleness {k})")

    if t not in self.in_flight:
      self._dispatch(t, weights_for(t))
    flight = self.in_flight.pop(t)
    rollout, times, figures = self.draw_iteration(
        _Drawer(self.engine, self.sample_fn, self.mesh, flight.first), flight.params, t)
    behaviour, spent = None, 0.0
    if k > 0 or self.quantized:  # queued before t + k's sampling on the rollout devices
      start = time.perf_counter()
      rows = dict(rollout.batch_rows(np.arange(len(rollout.mask))), mask=rollout.mask)
      behaviour = self._behaviour(flight.params, to_global(rows, self.mesh, self.rules))
      spent = time.perf_counter() - start
    for j in range(t + 1, min(t + k, self.steps - 1) + 1):
      if j not in self.in_flight:
        self._dispatch(j, weights_for(j))
    if behaviour is not None:
      start = time.perf_counter()
      rollout = dataclasses.replace(rollout, behaviour_log_probs=to_host(behaviour))
      times["behaviour_s"] = spent + time.perf_counter() - start
    figures["staleness"] = float(t - flight.behaviour)
    return rollout, times, figures
