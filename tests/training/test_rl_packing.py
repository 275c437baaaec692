"""Packed RL updates (training/rl/packing.py): the layout, and packed == unpacked losses and
gradients of every GRPO loss type and of PPO with a value head, in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401
from configs import grpo as grpo_config
from configs import ppo as ppo_config
from objectives import grpo as grpo_lib
from training.rl.grpo import grpo_forward
from training.rl.packing import pack_episodes, real_tokens
from training.rl.policy import build_actor_critic_spec
from training.rl.ppo import ppo_forward
from training.rl.rollout import build_rows

VOCAB = 64
SMALL = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
             vocab_size=VOCAB)
P, T, B = 10, 8, 8


def _episodes(seed: int) -> dict[str, np.ndarray]:
  """B rows of left-padded prompts (1..P tokens) and replies (0..T tokens: row 0 has none,
  as dynamic sampling's filler groups), with random per-token fields as make_batch gives."""
  rng = np.random.default_rng(seed)
  prompt_lengths = rng.integers(1, P + 1, B)
  reply_lengths = rng.integers(1, T + 1, B)
  reply_lengths[0] = 0
  reply_lengths[1], prompt_lengths[1] = T, P  # a full row
  prompt = rng.integers(3, VOCAB, (B, P)) * (np.arange(P)[None] >= P - prompt_lengths[:, None])
  mask = (np.arange(T)[None] < reply_lengths[:, None]).astype(np.float32)
  reply = (rng.integers(3, VOCAB, (B, T)) * mask).astype(np.int32)
  rows = build_rows(prompt.astype(np.int32), prompt_lengths.astype(np.int32), reply, mask)
  arrays = {k: rows[k] for k in ("tokens", "positions", "segment_ids")}
  per_token = lambda scale: (rng.normal(size=(B, T)) * scale * mask).astype(np.float32)
  arrays.update(mask=mask, advantages=per_token(1.0),
                old_log_probs=(-np.abs(per_token(2.0)) - 0.5 * mask).astype(np.float32),
                ref_log_probs=(-np.abs(per_token(2.0)) - 0.5 * mask).astype(np.float32),
                old_values=per_token(0.5), returns=per_token(1.0))
  return arrays


def test_pack_episodes_layout():
  """Two short episodes share a row, first-fit decreasing; per-token fields sit on the
  targets' columns; a reply-less row is left out; rows round up to the multiple."""
  prompts = np.array([[0, 0, 5, 6], [0, 7, 8, 9], [0, 0, 0, 4]], np.int32)
  replies = np.array([[11, 3, 0], [12, 13, 3], [0, 0, 0]], np.int32)
  mask = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], np.float32)
  rows = build_rows(prompts, np.array([2, 3, 1]), replies, mask)
  arrays = dict({k: rows[k] for k in ("tokens", "positions", "segment_ids")}, mask=mask,
                advantages=mask * np.array([[1.0], [2.0], [3.0]], np.float32))
  packed = pack_episodes(arrays, np.arange(3), multiple=2)
  # Row width 7: episode 1 (6 tokens) first, episode 0 (4 tokens) fits no row with it.
  np.testing.assert_array_equal(packed["tokens"], [[7, 8, 9, 12, 13, 3, 0],
                                                   [5, 6, 11, 3, 0, 0, 0]])
  np.testing.assert_array_equal(packed["segment_ids"], [[1] * 6 + [0], [1] * 4 + [0] * 3])
  np.testing.assert_array_equal(packed["positions"], [[0, 1, 2, 3, 4, 5, 0],
                                                      [0, 1, 2, 3, 0, 0, 0]])
  np.testing.assert_array_equal(packed["mask"], [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(packed["advantages"], [[0, 0, 2, 2, 2, 0], [0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(packed["budget"], [[3.0], [3.0]])
  assert real_tokens(arrays, np.arange(3)) == 10 + 1  # the reply-less row's prompt token
  # Short episodes share rows; the multiple pads with empty rows.
  short_mask = np.array([[1, 0, 0], [1, 0, 0]], np.float32)
  rows = build_rows(prompts[:2], np.array([2, 3]), replies[:2] * short_mask, short_mask)
  short = dict({k: rows[k] for k in ("tokens", "positions", "segment_ids")}, mask=short_mask,
               advantages=short_mask)
  packed = pack_episodes(short, np.arange(2), multiple=4)
  assert packed["tokens"].shape == (4, 7)
  np.testing.assert_array_equal(packed["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(packed["tokens"][0], [7, 8, 9, 12, 5, 6, 11])
  assert not packed["segment_ids"][1:].any() and not packed["mask"][1:].any()
  # A tool episode: the environment's token (present, masked out) is packed with the reply.
  tool_mask = np.array([[1, 0, 1]], np.float32)
  rows = build_rows(prompts[1:2], np.array([3]), replies[1:2], np.ones((1, 3), np.float32))
  tool = dict({k: rows[k] for k in ("tokens", "positions", "segment_ids")}, mask=tool_mask,
              advantages=tool_mask)
  packed = pack_episodes(tool, np.arange(1), multiple=1)
  np.testing.assert_array_equal(packed["tokens"], [[7, 8, 9, 12, 13, 3, 0]])
  np.testing.assert_array_equal(packed["mask"], [[0, 0, 1, 0, 1, 0]])


def _grads(loss_fn, spec, params, batch, cfg):
  def loss(params):
    _, metrics = loss_fn(spec.bind(params), batch, None, cfg, {})
    total, weight = metrics["loss"]
    return total / weight, {k: v[0] / v[1] for k, v in metrics.items()}
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _assert_same(unpacked, packed, keys):
  (loss_u, metrics_u), grads_u = unpacked
  (loss_p, metrics_p), grads_p = packed
  np.testing.assert_allclose(loss_p, loss_u, rtol=2e-5, atol=1e-6)
  for key in keys:
    np.testing.assert_allclose(metrics_p[key], metrics_u[key], rtol=2e-5, atol=1e-6,
                               err_msg=key)
  flat_u, flat_p = jax.tree.leaves(grads_u), jax.tree.leaves(grads_p)
  scale = max(float(jnp.abs(g).max()) for g in flat_u)
  assert scale > 1e-4  # the gradients are not trivially zero
  for gu, gp in zip(flat_u, flat_p):
    np.testing.assert_allclose(np.asarray(gp), np.asarray(gu), rtol=1e-4, atol=1e-6 * scale)


@pytest.fixture(scope="module")
def models_and_episodes():
  config = ppo_config.get_config("tiny")
  config.model.update(SMALL)
  policy = build_actor_critic_spec(config.model, "none")
  critic = build_actor_critic_spec(config.model, "head")
  return (policy, policy.init(jax.random.PRNGKey(0)), critic,
          critic.init(jax.random.PRNGKey(1)), _episodes(0))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "gspo", "cispo"])
def test_grpo_packed_equals_unpacked(models_and_episodes, loss_type):
  spec, params, _, _, arrays = models_and_episodes
  cfg = grpo_config.get_config("tiny").objective
  cfg.update(dict(loss_type=loss_type, kl_coef=0.1, clip_eps_low=0.1, clip_eps_high=0.15))
  index = np.array([3, 0, 5, 1, 7, 2, 6, 4])
  keys = ("policy_loss", "clip_fraction", "ratio", "ref_kl", "reply_kl")
  unpacked = {k: v[index] for k, v in arrays.items() if k not in ("old_values", "returns")}
  packed = pack_episodes(unpacked, np.arange(B), multiple=2)
  assert packed["tokens"].shape[0] < B  # the episodes did pack
  _assert_same(_grads(grpo_forward, spec, params, unpacked, cfg),
               _grads(grpo_forward, spec, params, packed, cfg), keys)
  # The bnpo (token) level and the on-policy path (no old log-probs) too.
  if loss_type == "grpo":
    cfg.loss_type = "bnpo"
    on_policy = lambda a: {k: v for k, v in a.items() if k != "old_log_probs"}
    _assert_same(_grads(grpo_forward, spec, params, on_policy(unpacked), cfg),
                 _grads(grpo_forward, spec, params, on_policy(packed), cfg), keys)


def test_ppo_packed_equals_unpacked_with_a_value_head(models_and_episodes):
  """PPO: values, advantages and returns line up with the packed tokens (the value head's
  gradient is checked with the policy's)."""
  _, _, spec, params, arrays = models_and_episodes
  cfg = ppo_config.get_config("tiny").objective
  cfg.update(dict(vf_coef=0.5, entropy_coef=0.01, value_clip=0.2))
  unpacked = {k: v for k, v in arrays.items() if k != "ref_log_probs"}
  packed = pack_episodes(unpacked, np.arange(B), multiple=1)
  assert packed["tokens"].shape[0] < B
  unpacked_result = _grads(ppo_forward, spec, params, unpacked, cfg)
  _assert_same(unpacked_result, _grads(ppo_forward, spec, params, packed, cfg),
               ("policy_loss", "value_loss", "value", "entropy", "ratio", "clip_fraction"))
  assert float(jnp.abs(unpacked_result[1]["value_head"]["kernel"]).max()) > 0


def test_packed_grpo_objective_matches_per_answer_reference():
  """objectives/grpo.py on two answers in one packed row equals the same answers one per
  row, for the levels that need per-answer sums (float64 numpy reference of the GSPO ratio
  and the constant level)."""
  log_probs = np.array([[-1.0, -2.0, -0.5, -0.7, -1.5, 0.0]], np.float32)
  old = np.array([[-1.1, -1.8, -0.5, -0.9, -1.2, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
  segments = np.array([[1, 1, 2, 2, 2, 0]])
  advantages = np.array([[0.5, 0.5, -1.0, -1.0, -1.0, 0.0]], np.float32)
  per_row = dict(log_probs=np.array([[-1.0, -2.0, 0], [-0.5, -0.7, -1.5]], np.float32),
                 old=np.array([[-1.1, -1.8, 0], [-0.5, -0.9, -1.2]], np.float32),
                 mask=np.array([[1, 1, 0], [1, 1, 1]], np.float32),
                 advantages=np.array([0.5, -1.0], np.float32))
  for loss_type in ("gspo", "dr_grpo", "grpo"):
    kw = dict(clip_eps_low=0.05, clip_eps_high=0.05, loss_type=loss_type)
    _, packed = grpo_lib.grpo_loss(log_probs, old, advantages, mask, segment_ids=segments,
                                   budget=4.0, **kw)
    _, rows = grpo_lib.grpo_loss(per_row["log_probs"], per_row["old"],
                                 per_row["advantages"], per_row["mask"], **kw)
    # One per row at width 3, the constant level's L = 3 there; the packed budget is 4.
    scale = 3.0 / 4.0 if loss_type == "dr_grpo" else 1.0
    np.testing.assert_allclose(packed["loss"][0] / packed["loss"][1],
                               scale * rows["loss"][0] / rows["loss"][1], rtol=1e-6)
    assert float(packed["loss"][1]) == (2.0 if loss_type != "bnpo" else 5.0)
  # GSPO's sequence ratios by hand: s_1 = exp((0.1 - 0.2) / 2), s_2 = exp((0 + 0.2 - 0.3) / 3).
  s = np.exp(np.array([-0.1 / 2, -0.1 / 3]))
  clipped = np.clip(s, 0.95, 1.05)
  a = np.array([0.5, -1.0])
  want = np.mean(np.maximum(-a * s, -a * clipped))
  _, metrics = grpo_lib.grpo_loss(log_probs, old, advantages, mask, segment_ids=segments,
                                  clip_eps_low=0.05, clip_eps_high=0.05, loss_type="gspo")
  np.testing.assert_allclose(metrics["loss"][0] / metrics["loss"][1], want, rtol=1e-6)
