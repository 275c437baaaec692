"""DAPO's rollout changes without a model: dynamic sampling's rounds (a stand-in engine), the
batch it leaves GRPO, extra rounds' prompts, and overlong reward shaping."""

import jax
import numpy as np
import pytest

from configs import grpo as grpo_config
from training.rl import grpo
from training.rl.rewards import overlong_penalties
from training.rl.rollout import Rollout, draw_groups, informative_groups, prompt_batch


class _Item:
  def __init__(self, name):
    self.prompt = name


class _Engine:
  """Stands in for RolloutEngine.draw: round r's rows score `rounds[r]`; row tokens name the
  round and row (100 r + i), and the keys it was given are kept."""

  def __init__(self, rounds):
    self.rounds, self.keys = rounds, []

  def draw(self, params, items, rng):
    r = len(self.keys)
    self.keys.append(rng)
    n = len(items)
    rollout = Rollout(prompts=[it.prompt for it in items],
                      rows={"tokens": (100 * r + np.arange(n))[:, None]},
                      mask=np.ones((n, 3), np.float32), replies=None,
                      stopped=np.ones(n, bool), scores=np.asarray(self.rounds[r], np.float32))
    return rollout, {"generate_s": 1.0, "score_s": 0.5}


def _round_items(r):
  return [_Item(f"round {r} prompt {i // 2}") for i in range(6)]


def test_informative_groups():
  np.testing.assert_array_equal(informative_groups([1, 1, 0, 1, 0, 0], 2), [False, True, False])


def test_dynamic_sampling_keeps_groups_with_a_signal_until_the_batch_is_full():
  # 3 groups of G = 2. Round 0: only group 1 has a signal; round 1: groups 0 and 2 do.
  engine = _Engine([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 0, 1], [0, 1] * 3])
  rng = jax.random.PRNGKey(7)
  rollout, times, figures = draw_groups(engine, None, _round_items, rng, groups=3, g=2,
                                        max_extra_rounds=4)
  assert len(engine.keys) == 2  # full after one extra round: no third draw
  np.testing.assert_array_equal(engine.keys[1], jax.random.fold_in(rng, 1))
  np.testing.assert_array_equal(engine.keys[0], rng)
  assert rollout.rows["tokens"][:, 0].tolist() == [2, 3, 100, 101, 104, 105]
  assert rollout.prompts[0] == "round 0 prompt 1" and rollout.prompts[2] == "round 1 prompt 0"
  np.testing.assert_array_equal(rollout.scores, [0, 1, 1, 0, 0, 1])
  assert times == {"generate_s": 2.0, "score_s": 1.0}
  assert figures == {"extra_rounds": 1.0, "zero_signal_drawn": 3 / 6, "filled_groups": 0.0,
                     "drawn_score": pytest.approx(7 / 12)}


def test_dynamic_sampling_fills_from_dropped_groups_at_the_cap_and_grpo_masks_them():
  engine = _Engine([[1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 1, 1]])
  rollout, _, figures = draw_groups(engine, None, _round_items, jax.random.PRNGKey(0),
                                    groups=3, g=2, max_extra_rounds=1)
  assert figures["extra_rounds"] == 1.0 and figures["filled_groups"] == 2.0
  assert figures["zero_signal_drawn"] == 5 / 6
  # The group with a signal, then the first two dropped ones (round 0's groups 0 and 2).
  assert rollout.rows["tokens"][:, 0].tolist() == [2, 3, 0, 1, 4, 5]
  config = grpo_config.get_config("tiny,dapo")
  config.rl.samples_per_prompt = 2
  rollout.rows.update(positions=rollout.rows["tokens"], segment_ids=rollout.rows["tokens"])
  rollout.ref_log_probs = np.zeros((6, 3), np.float32)
  arrays, batch_figures = grpo.make_batch(rollout, config, 0.0)
  np.testing.assert_array_equal(arrays["mask"].sum(-1), [3, 3, 0, 0, 0, 0])
  assert batch_figures["zero_advantage_groups"] == pytest.approx(2 / 3)
  assert "old_log_probs" not in arrays  # no policy pass: the loss reuses its own
  # Without dynamic sampling groups of equal scores stay in the loss (GRPO's normaliser).
  config.rl.dynamic_sampling = False
  rollout.log_probs = np.zeros((6, 3), np.float32)
  arrays, _ = grpo.make_batch(rollout, config, 0.0)
  assert arrays["mask"].sum() == 18 and "old_log_probs" in arrays


def test_extra_rounds_draw_other_prompts_as_pure_functions():
  items = list(range(10))
  first = prompt_batch(items, 3, 4, 0)
  extra = prompt_batch(items, 3, 4, 0, stream=1)
  assert extra == prompt_batch(items, 3, 4, 0, stream=1)
  assert extra != first and extra != prompt_batch(items, 3, 4, 0, stream=2)
  assert first == prompt_batch(items, 3, 4, 0, stream=0)  # round 0: the stream of old


def test_overlong_shaping_hand_computed():
  # Budget 20, buffer 5: 0 up to 15 tokens, then -1/5 per token, -1 at 20 and beyond.
  np.testing.assert_allclose(overlong_penalties([3, 15, 16, 18, 20, 23], 20, 5),
                             [0, 0, -0.2, -0.6, -1, -1], rtol=1e-6)
  np.testing.assert_array_equal(overlong_penalties([3, 20], 20, 0), [0, 0])
  with pytest.raises(ValueError, match="overlong_buffer"):
    overlong_penalties([3], 4, 5)
  config = grpo_config.get_config("tiny,dapo")
  assert config.reward.overlong_buffer == config.rl.max_new_tokens // 5
  assert config.objective.clip_eps_high == 0.28 and config.rl.dynamic_sampling
