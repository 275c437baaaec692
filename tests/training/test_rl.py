"""The RL loop end to end on a shrunken model: PPO, GRPO and online DPO iterations, metrics,
the first update's ratio of exactly 1, checkpoints that load as a decoder, and resume."""

import json
import os

import jax
import numpy as np
import pytest

import models  # noqa: F401
from configs import grpo as grpo_config
from configs import online_dpo as online_dpo_config
from configs import ppo as ppo_config
from configs.run_layout import CONFIG_FILE
from data import tiny_world
from data.pipeline import resolve_tokenizer
from data.prompts import fit_prompt, load_prompts
from data.tokenizer import train_sentencepiece
from models.build import build_model_spec
from scripts.benchmarks.grpo import format_grpo, grpo_flops
from scripts.benchmarks.ppo import ppo_flops
from scripts.evaluate import evaluate_run
from training import outer_loop
from training.checkpoint import Checkpointer
from training.metrics import read_metrics
from training.preemption import Preempted
from training.registry import get_stage
from training.rl.evaluation import Evaluator
from training.rl.loop import RLTrainer, minibatch_plan, train_rl
from training.rl.rollout import build_rows, prompt_batch

VOCAB = 384
SMALL = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
             vocab_size=VOCAB)


def shrink(config, base_dir, reward_dir, steps):
  config.init_from = base_dir
  config.model.update(SMALL)
  config.data.update(dict(tiny_task_train_records=64, tiny_task_eval_records=32,
                          tokenizer_vocab_size=VOCAB))
  config.rl.update(dict(prompts_per_iteration=8, max_prompt_len=32, max_new_tokens=6,
                        epochs=2, minibatches=2))
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  config.train.update(dict(steps=steps, eval_every=steps, log_every=1))
  config.checkpoint.update(dict(every_steps=1, async_save=False, max_to_keep=5))
  config.optimizer.update(dict(lr=1e-3, warmup_steps=1))
  config.eval.update(dict(num_prompts=8, max_new_tokens=6, batch_size=8, samples=2))
  if config.value.source == "model":
    config.value.source = "head"  # one model fewer to build and compile
  if reward_dir:
    config.reward.model = reward_dir
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A stand-in SFT run (tokenizer + random decoder params) and reward-model run."""
  base = tmp_path_factory.mktemp("sft")
  train_sentencepiece(tiny_world.generate_documents("train", 1500),
                      str(base / "tokenizer" / "spm"), VOCAB)
  config = shrink(ppo_config.get_config("tiny"), str(base), "", 1)
  spec = build_model_spec(config.model)
  with Checkpointer(str(base / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(1, {"params": spec.init(jax.random.PRNGKey(1))}, force=True)
  reward = tmp_path_factory.mktemp("reward")
  reward_spec = build_model_spec(config.model, "reward")
  with Checkpointer(str(reward / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(1, {"params": reward_spec.init(jax.random.PRNGKey(2))}, force=True)
  with open(reward / CONFIG_FILE, "w") as f:
    json.dump({"model": config.model.to_dict(), "objective": {"name": "reward"}}, f)
  return str(base), str(reward)


@pytest.fixture(scope="module")
def ppo_setup(runs, tmp_path_factory):
  """The PPO config and one RLTrainer for every PPO run below (compiled once)."""
  config = shrink(ppo_config.get_config("tiny"), runs[0], "", 2)
  data_dir = str(tmp_path_factory.mktemp("prompts"))
  tokenizer = resolve_tokenizer(config.data, data_dir)
  trainer = RLTrainer(config, tokenizer=tokenizer,
                      train_items=load_prompts(config, tokenizer, "train", data_dir),
                      eval_items=load_prompts(config, tokenizer, "eval", data_dir,
                                              distinct=True, limit=8))
  return config, trainer


@pytest.fixture(scope="module")
def ppo_run(ppo_setup, tmp_path_factory):
  config, trainer = ppo_setup
  workdir = str(tmp_path_factory.mktemp("ppo"))
  return workdir, train_rl(config, workdir, trainer=trainer)


def _finite_records(workdir):
  records = read_metrics(workdir)
  for r in records:
    assert all(np.isfinite(v) for v in r.values()), r
  return records


def test_ppo_iterations_report_every_figure(ppo_run):
  workdir, final = ppo_run
  records = _finite_records(workdir)
  assert [r["step"] for r in records] == [0, 1, 2]
  assert set(records[0]) == {"step"} | {
      f"{prefix}/{k}" for prefix in ("eval", "eval_train")
      for k in ("reward", "kl", "answer_accuracy", "stop_rate", "response_length",
                "sampled_reward", "sampled_kl", "sampled_answer_accuracy",
                "sampled_stop_rate")}
  for prefix in ("eval", "eval_train"):
    first = {k.split("/")[1]: v for k, v in records[0].items() if k.startswith(prefix + "/")}
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert first["sampled_kl"] == pytest.approx(0.0, abs=1e-5)
    # 8 prompts x 2 samples: shares of 16 replies; a score is the answer check (0 / 1)
    # minus 1 when unstopped.
    assert first["sampled_answer_accuracy"] * 16 == pytest.approx(
        round(first["sampled_answer_accuracy"] * 16))
    assert first["sampled_reward"] == pytest.approx(
        first["sampled_answer_accuracy"] - (1 - first["sampled_stop_rate"]))
  for r in records[1:]:
    for key in ("score", "kl", "kl_coef", "entropy", "clip_fraction", "approx_kl", "value_loss",
                "explained_variance", "response_length", "stop_rate", "policy_loss", "loss"):
      assert f"train/{key}" in r, key
    # The rollout's log-probs are the policy's own: the first minibatch's ratio is exactly 1.
    assert r["train/ratio_first_minibatch"] == 1.0
    assert r["perf/generate_s"] > 0 and r["perf/update_s"] > 0
    assert 1.0 <= r["train/response_length"] <= 6.0
  assert "eval/answer_accuracy" in final and records[2]["eval/kl"] > 0
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_rl_checkpoint_loads_as_a_decoder_and_the_stage_is_registered(runs, ppo_setup,
                                                                      ppo_run):
  spec = build_model_spec(ppo_setup[0].model)
  params = Checkpointer.restore_params(ppo_run[0], spec.shapes)
  start = Checkpointer.restore_params(runs[0], spec.shapes)
  # 2 iterations x 2 epochs x 2 minibatches of Adam at lr <= 1e-3: every param moves < 0.01.
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       params, start)
  assert 0 < max(jax.tree.leaves(moved)) < 0.01
  for name in ("ppo", "grpo", "rloo", "online_dpo"):
    assert get_stage(name).train is not None and get_stage(name).model_kind == "decoder"


def test_evaluate_script_reproduces_an_rl_runs_last_evaluation(ppo_run):
  """`scripts.evaluate` on an RL run: its held-out rollouts of the latest policy, the figures
  the run's own last evaluation logged."""
  workdir, _ = ppo_run
  last = {k: v for k, v in read_metrics(workdir)[-1].items()
          if k.startswith(("eval/", "eval_train/"))}
  assert "eval/reward" in last and "eval_train/sampled_reward" in last
  assert evaluate_run(workdir) == pytest.approx(last, abs=1e-6)


def test_ppo_resume_equals_uninterrupted(ppo_setup, ppo_run, tmp_path):
  config, trainer = ppo_setup
  workdir = str(tmp_path / "resumed")
  train_rl(config, workdir, trainer=trainer, stop_after=1)  # 'killed' after iteration 1
  train_rl(config, workdir, trainer=trainer)  # the same command again resumes
  want = {r["step"]: r for r in read_metrics(ppo_run[0])}
  got = {r["step"]: r for r in read_metrics(workdir)}
  for key in ("train/loss", "train/score", "train/kl", "train/kl_coef", "eval/reward",
              "eval/kl", "eval/sampled_reward", "eval/sampled_kl", "eval_train/sampled_reward"):
    assert got[2][key] == pytest.approx(want[2][key], abs=1e-6), key
  spec = build_model_spec(config.model)
  a = Checkpointer.restore_params(ppo_run[0], spec.shapes)
  b = Checkpointer.restore_params(workdir, spec.shapes)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


class _NoticeAfterFirstStep:
  """Stands in for training/preemption.py's watch: a notice arrives during iteration 1 (the
  signal path itself is tested on real processes in tests/training/test_preemption.py)."""

  signal_name = "SIGTERM"

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    pass

  def should_stop(self, step):
    return step >= 1


def test_a_preempted_rl_run_checkpoints_its_iteration_and_resumes(ppo_setup, ppo_run,
                                                                  tmp_path, monkeypatch):
  config, trainer = ppo_setup
  workdir = str(tmp_path / "preempted")
  with monkeypatch.context() as patch:
    patch.setattr(outer_loop, "PreemptionWatch", _NoticeAfterFirstStep)
    with pytest.raises(Preempted, match="at step 1"):
      train_rl(config, workdir, trainer=trainer)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [1]  # every_steps is 1 here; the forced save is that step's
  ckpt.close()
  train_rl(config, workdir, trainer=trainer)  # the rerun resumes and finishes
  want = {r["step"]: r for r in read_metrics(ppo_run[0])}
  got = {r["step"]: r for r in read_metrics(workdir)}
  assert got[2]["train/loss"] == pytest.approx(want[2]["train/loss"], abs=1e-6)
  assert got[2]["eval/reward"] == pytest.approx(want[2]["eval/reward"], abs=1e-6)


def test_sampled_evaluation_is_reproducible_and_greedy_at_temperature_zero(ppo_setup,
                                                                         ppo_run):
  config, trainer = ppo_setup
  params = trainer.fresh_state()["params"]  # the policy of iteration 0
  items = trainer.evaluator.sets["eval"]
  # Fixed sampling keys: the iteration-0 figures of the run come out again, to the bit.
  first = {k: v for k, v in read_metrics(ppo_run[0])[0].items() if k.startswith("eval/")}
  assert {f"eval/{k}": v for k, v in trainer.evaluator.evaluate(params, items).items()} == first
  # Sampling at temperature 0, one sample per prompt, is the greedy evaluation.
  greedy = Evaluator(trainer.engine, {"eval": items}, batch_size=config.eval.batch_size,
                     max_new_tokens=config.eval.max_new_tokens, samples=1,
                     sampling=dict(temperature=0.0))
  figures = greedy.evaluate(params, items)
  for key in ("reward", "kl", "answer_accuracy", "stop_rate"):
    assert figures[f"sampled_{key}"] == pytest.approx(figures[key], abs=1e-6), key


def test_grpo_with_a_reward_model(runs, tmp_path):
  config = shrink(grpo_config.get_config("tiny"), runs[0], runs[1], 1)
  config.reward.function = ""
  config.train.eval_every = 0
  config.rl.update(dict(prompts_per_iteration=2, samples_per_prompt=4))
  train_rl(config, str(tmp_path / "grpo"))
  (record,) = _finite_records(str(tmp_path / "grpo"))
  assert record["train/ratio_first_minibatch"] == 1.0
  assert record["train/zero_advantage_groups"] == 0.0  # reward-model scores differ
  assert "train/ref_kl" in record and "train/clip_fraction" in record


def test_grpo_on_policy_update_skips_the_old_forward_exactly(runs, tmp_path, monkeypatch):
  """One epoch of one minibatch: the rollout runs no policy pass and the loss reads its own
  log-probs as pi_old; the iteration equals the one with the pass. Then dynamic sampling with
  every score equal: the cap's extra round is drawn and the masked batch moves nothing."""
  config = shrink(grpo_config.get_config("tiny"), runs[0], runs[1], 1)
  config.reward.function = ""  # reward-model scores: every group has a signal
  config.train.eval_every = 0
  config.rl.update(dict(prompts_per_iteration=2, samples_per_prompt=4, epochs=1, minibatches=1,
                        dynamic_sampling_max_rounds=1))
  tokenizer = resolve_tokenizer(config.data, str(tmp_path))
  trainer = RLTrainer(config, tokenizer=tokenizer,
                      train_items=load_prompts(config, tokenizer, "train", str(tmp_path)))
  assert not trainer.old_log_probs_forward
  leaves = lambda state: [np.asarray(x) for x in jax.tree.leaves(state["params"])]
  skipped_state, skipped, _ = trainer.iteration(trainer.fresh_state(), 0, 0.04)
  trainer.old_log_probs_forward = True
  full_state, full, _ = trainer.iteration(trainer.fresh_state(), 0, 0.04)
  assert skipped["train/ratio_first_minibatch"] == full["train/ratio_first_minibatch"] == 1.0
  for key in ("train/loss", "train/kl", "train/grad_norm", "train/ref_kl", "train/score"):
    assert skipped[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
  assert full["train/kl"] == pytest.approx(full["train/reply_kl"], rel=1e-5, abs=1e-7)
  for a, b in zip(leaves(skipped_state), leaves(full_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  two_updates = config.copy_and_resolve_references()
  two_updates.rl.minibatches = 2
  with pytest.raises(ValueError, match="needs pi_old's forward pass"):
    RLTrainer(two_updates, tokenizer=tokenizer, train_items=trainer.train_items,
              old_log_probs_forward=False)

  monkeypatch.setattr(config.rl, "dynamic_sampling", True)
  monkeypatch.setattr(trainer.engine, "score",
                      lambda rows, replies, stopped, prompts: np.zeros(len(stopped), np.float32))
  state = trainer.fresh_state()
  before = leaves(state)
  state, record, _ = trainer.iteration(state, 0, 0.04)
  assert record["train/extra_rounds"] == 1.0 and record["train/filled_groups"] == 2.0
  assert record["train/zero_advantage_groups"] == 1.0 and record["train/loss"] == 0.0
  for a, b in zip(before, leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_online_dpo_pairs_best_and_worst(runs, tmp_path):
  config = shrink(online_dpo_config.get_config("tiny"), runs[0], runs[1], 1)
  config.train.eval_every = 0
  config.rl.update(dict(prompts_per_iteration=8, samples_per_prompt=2))
  train_rl(config, str(tmp_path / "odpo"))
  (record,) = _finite_records(str(tmp_path / "odpo"))
  assert record["train/pairs"] == 1.0  # function + reward model: no ties
  assert record["train/chosen_score"] > record["train/rejected_score"]
  assert "train/rewards/accuracies" in record and "train/loss" in record


def test_rows_layout_prompt_batches_and_minibatch_plan():
  rows = build_rows(np.array([[0, 0, 5, 6], [7, 8, 9, 10]]), np.array([2, 4]),
                    np.array([[11, 3, 0], [12, 13, 14]]), np.array([[1, 1, 0], [1, 1, 1]]))
  np.testing.assert_array_equal(rows["tokens"], [[0, 0, 5, 6, 11, 3, 0],
                                                 [7, 8, 9, 10, 12, 13, 14]])
  np.testing.assert_array_equal(rows["segment_ids"], [[0, 0, 1, 1, 1, 1, 0], [1] * 7])
  np.testing.assert_array_equal(rows["positions"], [[0, 0, 0, 1, 2, 3, 0], list(range(7))])
  np.testing.assert_array_equal(rows["last"], [5, 6])
  assert fit_prompt([2, 4, 5, 6, 7], 3) == [2, 6, 7]
  items = list(range(10))
  first = prompt_batch(items, 0, 4, 0) + prompt_batch(items, 1, 4, 0)
  assert prompt_batch(items, 1, 4, 0) == prompt_batch(items, 1, 4, 0)  # pure
  assert len(set(first)) == 8 and set(first + prompt_batch(items, 4, 2, 0)) == set(items)
  plan = minibatch_plan(8, 2, 4, 0, 5)
  assert len(plan) == 2 and all(len(m) == 2 for epoch in plan for m in epoch)
  for epoch in plan:
    assert sorted(np.concatenate(epoch).tolist()) == list(range(8))


def test_benchmark_ppo_splits_an_iteration():
  # No run directory: random prompts, no tokenizer.
  from scripts.benchmarks.ppo import benchmark_ppo, format_ppo
  config = ppo_config.get_config("bench")
  config.model.update(SMALL)
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  result = benchmark_ppo(config, prompts=8, new_tokens=4, prompt_len=8, repeats=1, warmup=0)
  for key in ("generate_s", "score_s", "update_s"):
    assert result[key] > 0
  assert result["iteration_s"] == pytest.approx(
      result["generate_s"] + result["score_s"] + result["update_s"], rel=1e-6)
  assert result["updates"] == config.rl.minibatches and result["prompts"] == 8
  # Stop ids lie outside the vocabulary: every reply runs to the end.
  assert result["response_length"] == 4 and result["new_tokens"] == 8 * 4
  config.rl.update(dict(prompts_per_iteration=8, samples_per_prompt=1, max_prompt_len=8,
                        max_new_tokens=4, epochs=1))
  flops = ppo_flops(config)
  # Scoring is three forward passes over the rows, generation about one.
  assert result["update_flops"] == flops["update"] > 0
  assert result["score_flops"] == flops["score"] > flops["generate"] == result["generate_flops"]
  assert result["model_flops_per_sec"] == pytest.approx(
      sum(flops.values()) / result["iteration_s"])
  assert "update" in format_ppo(result)


def test_benchmark_grpo_flops_and_report():
  """Without the pi_old pass, scoring is one policy forward cheaper (its FLOPs are one third
  of an update's); the figures' report names which path ran."""
  config = grpo_config.get_config("bench")
  assert (config.rl.prompts_per_iteration, config.rl.samples_per_prompt, config.rl.epochs,
          config.rl.minibatches, config.value.source) == (4, 4, 1, 1, "none")
  full, skipped = grpo_flops(config, True), grpo_flops(config, False)
  assert full == ppo_flops(config)
  assert full["score"] - skipped["score"] == full["update"] // 3 > 0
  assert skipped["generate"] == full["generate"] and skipped["update"] == full["update"]
  result = dict(params=1e6, prompts=4, samples=4, new_tokens_per_reply=64, prompt_len=64,
                loss_type="grpo", kl_coef=0.04, updates=1, dtype="float32", devices=1,
                platform="cpu", iteration_s=3.0, repeats=3, first_iteration_s=9.0,
                generate_s=1.0, score_s=1.0, update_s=1.0, new_tokens_per_sec=1024.0,
                model_flops_per_sec=1e9, old_log_probs_forward=False,
                **{f"{k}_flops": v for k, v in skipped.items()})
  assert "no pi_old pass: on-policy, skipped" in format_grpo(result)
  assert "policy's pi_old pass" in format_grpo(dict(result, old_log_probs_forward=True))
  # Int8 rollouts: pi_old's pass runs, and mu's pass costs one more policy forward.
  int8 = grpo_flops(config, True, behaviour_forward=True)
  assert int8["behaviour"] == full["update"] // 3 and int8["score"] == full["score"]
  text = format_grpo(dict(result, old_log_probs_forward=True, weights="int8", behaviour_s=0.5,
                          **{f"{k}_flops": v for k, v in int8.items()}))
  assert "with int8 rollouts" in text
  assert f"behaviour      0.50 s (int8 rollouts' mu pass; {int8['behaviour'] / 0.5e9:.1f} G" in text

