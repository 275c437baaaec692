"""Multi-turn episodes with tools: the model and an environment take turns, the model learns
only its own tokens.

With `config.rl.tools` set (a toolset of data/tools.py) every rollout and evaluation reply of
training/rl/rollout.py is an episode instead of a single reply:

    prompt (rendered, left-padded to P = rl.max_prompt_len)
    repeat, at most rl.max_turns model turns:
      the model samples a reply of at most rl.max_new_tokens tokens (models/sampler.py,
        re-prefilling prompt + episode so far: each turn is one sampler call on the batch)
      the environment (data/tools.py ToolEnvironment) reads it:
        a call block -> the result, appended as a tool turn and the next assistant header
                        (data/chat_template.py `tool_result_tokens`); the model goes on
        no call      -> the final answer: the episode ends

The episode's tokens after the prompt, the model's and the environment's, fill the reply
region of the row, `[B, T]` with T = rl.max_episode_tokens (tokens past it are cut):

    tokens     <tool>lookup: salt, price</tool>E | S<result>...</result>E A | 9 sacks ... E
    present    1 ...                             | 1 ...                    | 1 ...
    loss_mask  1 ...                           1 | 0 ...                  0 | 1 ...       1

(E: the closing token, S / A: tool and assistant headers.) `present` marks real tokens, so
the rows' positions and segment ids (rollout.py `build_rows`) cover the environment's tokens
and every model token attends to the results it was given; `loss_mask` is the rollout's
`mask`: log-probs, KL and the policy loss count the model's tokens only, the way SFT masks
everything but the assistant turns. Response lengths in the metrics are model tokens.

An episode ends with its final answer (the reply read by the reward function and answer
check; `stopped` when it ended with a stop token), or is cut: a turn that ran out of tokens
(rl.max_new_tokens, or the episode budget), a call at the last allowed turn, or a result
that does not fit the budget. A cut episode has no answer: its reply is '' and it counts as
unstopped (config.reward.missing_stop_penalty). `run_episodes` is the loop on numpy, driven
by any `generate(contexts, turn)` (tests script one); `EpisodeSampler` runs it on a jitted
sampler and the run's mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from data import chat_template
from data.conversation import Prompt
from data.prompts import PromptItem
from data.tools import Environment, ToolEnvironment, get_toolset
from models.sampler import left_pad
from parallel.host_data import to_global, to_host

# (contexts: prompt + episode so far per row, turn) -> the new tokens of each row, its stop
# token included when it stopped.
Generate = Callable[[list[list[int]], int], list[list[int]]]


@dataclasses.dataclass
class Episodes:
  """B episodes (numpy); the reply region `[B, T]` as in the module docstring."""
  prompt_tokens: np.ndarray   # [B, P] int32, left-padded
  prompt_lengths: np.ndarray  # [B] int32
  tokens: np.ndarray          # [B, T] int32: model and environment tokens, then padding
  present: np.ndarray         # [B, T] float32: 1 on every episode token
  loss_mask: np.ndarray       # [B, T] float32: 1 on the model's tokens only
  replies: list[str]          # the final answer per row ('' when cut)
  stopped: np.ndarray         # [B] bool: ended with an answer closed by a stop token
  turns: np.ndarray           # [B] int32: model turns taken
  calls: np.ndarray           # [B] int32: results the environment appended
  rewards: np.ndarray         # [B] float32: the environments' summed rewards


def run_episodes(generate: Generate, prompt_tokens: Sequence[Sequence[int]],
                 prompts: Sequence[Prompt], envs: Sequence[Environment], *, tokenizer,
                 template: str, stop_ids: Sequence[int], max_prompt_len: int, max_turns: int,
                 max_tokens: int, pad_id: int = 0) -> Episodes:
  """Runs one episode per row to its end (module docstring).

  Args:
    generate: samples one turn of every row (all rows each turn: the batch keeps its shape;
      the rows already done are ignored).
    prompt_tokens: each row's rendered prompt (at most `max_prompt_len` tokens).
    prompts: each row's prompt, handed to its environment's `reset`.
    envs: one environment per row.
    tokenizer: decodes replies, encodes results.
    template: the chat template of the results' tool turns.
    stop_ids: tokens that end a reply.
    max_prompt_len: P, the width of `prompt_tokens` in the result.
    max_turns: model turns per episode at most.
    max_tokens: T, tokens after the prompt at most.
    pad_id: fills the padding.
  """
  if max_turns < 1 or max_tokens < 1:
    raise ValueError(f"need max_turns >= 1 and max_tokens >= 1, got {max_turns}, {max_tokens}")
  if not len(prompt_tokens) == len(prompts) == len(envs):
    raise ValueError(f"{len(prompt_tokens)} prompts, {len(prompts)} records and {len(envs)} "
                     "environments: one each per row")
  b, stops = len(prompts), set(int(s) for s in stop_ids)
  episode = [[] for _ in range(b)]
  loss = [[] for _ in range(b)]
  replies, stopped = [""] * b, np.zeros(b, bool)
  turns, calls = np.zeros(b, np.int32), np.zeros(b, np.int32)
  rewards, done = np.zeros(b, np.float32), np.zeros(b, bool)
  for env, prompt in zip(envs, prompts):
    env.reset(prompt)
  for turn in range(max_turns):
    if done.all():
      break
    new = generate([list(p) + e for p, e in zip(prompt_tokens, episode)], turn)
    for i in np.flatnonzero(~done):
      out = list(new[i])[:max_tokens - len(episode[i])]
      episode[i] += out
      loss[i] += [1.0] * len(out)
      turns[i] += 1
      if not out or out[-1] not in stops:  # out of tokens mid-reply: cut
        done[i] = True
        continue
      result = envs[i].step(tokenizer.decode(out[:-1]))
      rewards[i] += result.reward
      if result.done:
        replies[i], stopped[i], done[i] = tokenizer.decode(out[:-1]), True, True
        continue
      appended = chat_template.tool_result_tokens(tokenizer, result.observation, template)
      if turn == max_turns - 1 or len(episode[i]) + len(appended) >= max_tokens:
        done[i] = True  # no turn, or no token, left to use the result: cut
        continue
      episode[i] += appended
      loss[i] += [0.0] * len(appended)
      calls[i] += 1
  tokens = np.full((b, max_tokens), pad_id, np.int32)
  present = np.zeros((b, max_tokens), np.float32)
  loss_mask = np.zeros((b, max_tokens), np.float32)
  for i in range(b):
    n = len(episode[i])
    tokens[i, :n], present[i, :n], loss_mask[i, :n] = episode[i], 1.0, loss[i]
  padded, lengths = left_pad(prompt_tokens, max_prompt_len, pad_id)
  return Episodes(prompt_tokens=padded, prompt_lengths=lengths, tokens=tokens,
                  present=present, loss_mask=loss_mask, replies=replies, stopped=stopped,
                  turns=turns, calls=calls, rewards=rewards)


class EpisodeSampler:
  """Tool episodes of one run: `sample(sample_fn, params, items, rng)` on its mesh."""

  def __init__(self, *, tokenizer, template: str, stop_ids: Sequence[int], toolset: str,
               max_prompt_len: int, max_turns: int, max_tokens: int, mesh=None, rules=None):
    self.tokenizer, self.template, self.stop_ids = tokenizer, template, list(stop_ids)
    self.tools = get_toolset(toolset)
    self.max_prompt_len, self.max_turns, self.max_tokens = max_prompt_len, max_turns, max_tokens
    self.mesh, self.rules = mesh, rules

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, tokenizer, stop_ids: Sequence[int],
                  mesh, rules) -> EpisodeSampler | None:
    """The run's sampler of episodes, or None when `config.rl.tools` is '' (or absent)."""
    rl = config.rl
    if not rl.get("tools", ""):
      return None
    return cls(tokenizer=tokenizer, template=config.data.chat_template, stop_ids=stop_ids,
               toolset=rl.tools, max_prompt_len=rl.max_prompt_len, max_turns=rl.max_turns,
               max_tokens=rl.max_episode_tokens, mesh=mesh, rules=rules)

  def sample(self, sample_fn, params, items: Sequence[PromptItem], rng: jax.Array, *,
             mesh=None) -> Episodes:
    """The episodes of `items`, each turn one call of `sample_fn` (models/sampler.py
    `make_sampler`'s) on contexts left-padded to P + T (one compiled shape); turn k samples
    with `fold_in(rng, k)`. `mesh`: where `params` and `sample_fn` live, if not the run's
    (off-policy rollout devices)."""
    width = self.max_prompt_len + self.max_tokens
    mesh = mesh or self.mesh

    def generate(contexts: list[list[int]], turn: int) -> list[list[int]]:
      tokens, lengths = left_pad(contexts, width, self.tokenizer.pad_id)
      if mesh is not None:
        device = to_global({"t": tokens, "l": lengths}, mesh, self.rules)
        tokens, lengths = device["t"], device["l"]
      out = sample_fn(params, tokens, lengths, jax.random.fold_in(rng, turn))
      new = to_host(out["tokens"]) if mesh is not None else np.asarray(out["tokens"])
      counts = to_host(out["lengths"]) if mesh is not None else np.asarray(out["lengths"])
      return [row[:n].tolist() for row, n in zip(new, counts)]

    envs = [ToolEnvironment(self.tools) for _ in items]
    return run_episodes(generate, [it.tokens for it in items], [it.prompt for it in items],
                        envs, tokenizer=self.tokenizer, template=self.template,
                        stop_ids=self.stop_ids, max_prompt_len=self.max_prompt_len,
                        max_turns=self.max_turns, max_tokens=self.max_tokens,
                        pad_id=self.tokenizer.pad_id)
