"""The trained model of the RL stages: a decoder policy, with a value function for PPO.

`ActorCritic` *is* a decoder (a subclass, as models/heads.py RewardModel is), so its params
are a decoder's (`embed`, `blocks`, `final_norm`, ...) plus, by `config.value.source`:

  none    nothing (GRPO, RLOO, online DPO)
  head    `value_head`: a models/heads.py ScalarHead (with bias) on the policy's own final
          hidden states; policy and value share the trunk, and the value loss trains it too
  model   `critic`: a separate RewardModel-shaped network (decoder + scalar head), e.g.
          started from the reward model as InstructGPT's value function (Ouyang et al., 2022,
          sec. 3.5)

An RL run's checkpoint therefore loads wherever a decoder's does (scripts/generate.py, a later
stage's `init_from`): partial restores ignore the extra value params. The sampler
(models/sampler.py) takes this spec and params as they are.

Response layout (training/rl/rollout.py): rows of `[batch, P + T]` tokens, the prompt
left-padded to P, the response of up to T tokens after it. The forward pass runs on
`tokens[:, :-1]`; its last T positions predict the response tokens, and their states are the
states the value function scores.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models.build import ModelSpec, Params, spec_of
from models.decoder import Decoder
from models.heads import RewardModel, ScalarHead
from objectives.clm import token_log_probs
from training.checkpoint import Checkpointer

VALUE_SOURCES = ("none", "head", "model")


class ActorCritic(Decoder):
  """A decoder policy with an optional value function (see the module docstring)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, value: str = "none"):
    if value not in VALUE_SOURCES:
      raise ValueError(f"config.value.source: unknown {value!r} ({' | '.join(VALUE_SOURCES)})")
    super().__init__(cfg, rngs=rngs)
    self.value_source = value
    if value == "head":
      self.value_head = ScalarHead(cfg, rngs=rngs, bias=True)
    elif value == "model":
      self.critic = RewardModel(cfg, rngs=rngs)

  def response_outputs(self, batch: dict[str, jax.Array], response_len: int
                       ) -> tuple[jax.Array, jax.Array | None]:
    """(logits `[batch, T, vocab]`, values `[batch, T]` or None) of the response positions."""
    inputs = shifted_inputs(batch)
    hidden = self.hidden_states(inputs["tokens"], positions=inputs["positions"],
                                segment_ids=inputs["segment_ids"])
    logits = self.logits(hidden[:, -response_len:])
    values = None
    if self.value_source == "head":
      values = self.value_head(hidden[:, -response_len:])
    elif self.value_source == "model":
      values = self.critic(inputs["tokens"], positions=inputs["positions"],
                           segment_ids=inputs["segment_ids"])[:, -response_len:]
    return logits, values


def shifted_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The forward pass's inputs: every row without its last token."""
  return {k: batch[k][:, :-1] for k in ("tokens", "positions", "segment_ids")}


def response_targets(batch: dict[str, jax.Array], response_len: int) -> jax.Array:
  """`[batch, T]` the response tokens (what the last T input positions predict)."""
  return batch["tokens"][:, -response_len:]


def response_logits(model: Decoder, batch: dict[str, jax.Array], response_len: int
                    ) -> jax.Array:
  """Logits `[batch, T, vocab]` of any decoder (policy or frozen reference) at the response
  positions; for an ActorCritic the same computation as `response_outputs`."""
  inputs = shifted_inputs(batch)
  hidden = model.hidden_states(inputs["tokens"], positions=inputs["positions"],
                               segment_ids=inputs["segment_ids"])
  return model.logits(hidden[:, -response_len:])


def response_log_probs(model: Decoder, batch: dict[str, jax.Array], response_len: int
                       ) -> jax.Array:
  """`[batch, T]` float32 log-probs of the response tokens under `model`."""
  return token_log_probs(response_logits(model, batch, response_len),
                         response_targets(batch, response_len))


def policy_outputs(model: ActorCritic, batch: dict[str, jax.Array], response_len: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(log-probs `[batch, T]` of the response tokens, logits `[batch, T, vocab]`, values
  `[batch, T]` or None): what every RL loss and the rollout's scoring pass compute, by the
  same code, so the first update's probability ratio is exactly 1."""
  logits, values = model.response_outputs(batch, response_len)
  return token_log_probs(logits, response_targets(batch, response_len)), logits, values


def build_actor_critic_spec(model_config: ml_collections.ConfigDict, value: str) -> ModelSpec:
  """The ModelSpec of an ActorCritic, traced abstractly (models/build.py `spec_of`)."""
  return spec_of(model_config, lambda rngs: ActorCritic(model_config, rngs=rngs, value=value))


@dataclasses.dataclass(frozen=True)
class InitSources:
  """Where the trained params start from ('' = keep the fresh init)."""
  policy: str         # the SFT run (config.init_from)
  critic: str = ""    # value.source 'model': a reward-model run, or a decoder run (fresh head)


def restore_initial_params(params: Params, abstract_params: Params, sources: InitSources
                           ) -> Params:
  """Fresh `params` with the policy (and critic) replaced by the given runs' params.

  The value head and anything the runs lack keep their fresh values.
  """
  if sources.policy:
    params = Checkpointer.restore_params(sources.policy, abstract_params, fresh_params=params)
  if sources.critic and "critic" in params:
    critic = Checkpointer.restore_params(sources.critic, abstract_params["critic"],
                                         fresh_params=params["critic"])
    params = dict(params, critic=critic)
  return params


def token_kl(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
  """Exact KL(p || q) = sum_v p_v (log p_v - log q_v) of two next-token distributions,
  `[..., vocab]` -> `[...]` float32 (the held-out KL along a reply, training/rl/evaluation)."""
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
