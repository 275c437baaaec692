"""DPO's reward / KL frontier on the tiny world: Rafailov et al. (2023), "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model", sec. 6.1, Fig. 2 (left).

Claim reproduced: on a task with a known (gold) reward, DPO at several beta reaches a higher
reward than PPO at every KL to the reference (SFT) policy: "DPO produces by far the most
efficient frontier, achieving the highest reward while still achieving low KL", dominating PPO
even when PPO optimises the gold reward itself (PPO-GT).

  python -m scripts.reproduce dpo_frontier --workdir runs/dpo_frontier
  python -m scripts.reproduce dpo_frontier --workdir runs/dpo_frontier_q --quick
  python -m scripts.reproduce dpo_frontier --workdir runs/dpo_frontier_2 \\
      --base_runs runs/dpo_frontier/base     # reuse the pretrain / SFT / reward-model runs

From one SFT policy (`{workdir}/base/sft`, or `config.base_runs`'s; pretrain -> SFT ->
reward model as scripts/pipeline.py chains them, with this config's step counts):
  DPO          configs/dpo.py:tiny at each of `dpo_betas` (`{workdir}/runs/dpo_beta{b}`)
  PPO          configs/ppo.py:tiny with the gold `tiny_answer` reward (the paper's PPO-GT) at
               each of `ppo_kl_coefs` (`{workdir}/runs/ppo_kl{c}`); every held-out evaluation
               along training is a point, as in the paper
  best-of-N    N replies sampled from the SFT policy, the one the learned reward model scores
               highest kept (the paper's best-of-N baseline), for each of `bon_ns`
All are scored on the same held-out questions (the RL stages' evaluation prompts) by the
tiny world's verifiable gold reward, the answer check, over `eval.samples` sampled replies per
question with fixed keys (training/rl/evaluation.py `eval/sampled_answer_accuracy`); the KL
to the SFT policy is measured on those same samples for every trained policy
(`eval/sampled_kl`: per reply, the exact per-token KL summed along it, an unbiased estimate
of KL(pi || pi_sft) of lower variance than the sampled log-ratio), and for best-of-N is the
analytic log N - (N - 1) / N of Stiennon et al. (2020) and Gao et al. (2023).
"""

import ml_collections

# The paper's finding, stated as the comparison the report makes (Fig. 2 left).
PAPER = dict(figure="Rafailov et al. 2023, Fig. 2 (left)",
             claim="DPO's reward / KL frontier dominates PPO's (and PPO-GT's)")


def add_base_runs(config: ml_collections.ConfigDict, arg: str) -> None:
  """The SFT / reward-model chain and the held-out evaluation shared by the RLHF
  reproductions (configs/papers/overoptimization.py too); presets full, quick, test."""
  if arg not in ("full", "quick", "test"):
    raise ValueError(f"unknown preset {arg!r}: full, quick, test")
  # A folder holding finished pretrain/, sft/ and reward/ runs (e.g. a scripts.pipeline
  # workdir) to start from instead of training them in {workdir}/base ('' = train them).
  config.base_runs = ""
  config.pretrain_steps = {"full": 600, "quick": 200, "test": 12}[arg]
  config.sft_steps = {"full": 200, "quick": 80, "test": 6}[arg]
  config.reward_steps = {"full": 150, "quick": 60, "test": 6}[arg]
  # Held-out evaluation of every policy: distinct questions, sampled replies per question
  # (temperature 1: the policy's own distribution), reply length.
  config.eval = ml_collections.ConfigDict(dict(
      num_prompts={"full": 64, "quick": 32, "test": 8}[arg],
      samples={"full": 8, "quick": 4, "test": 2}[arg],
      max_new_tokens={"full": 24, "quick": 24, "test": 8}[arg],
  ))


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  """`full` (under an hour on 2 CPU cores: 48 minutes on a heavily shared machine,
  docs/reproductions.md), `quick` (minutes) or `test` (the test suite's)."""
  config = ml_collections.ConfigDict()
  add_base_runs(config, arg)
  config.dpo_betas = {"full": [0.05, 0.1, 0.3, 1.0], "quick": [0.1, 0.5],
                      "test": [0.1, 1.0]}[arg]
  config.dpo_steps = {"full": 120, "quick": 40, "test": 3}[arg]
  config.ppo_kl_coefs = {"full": [0.01, 0.05, 0.2], "quick": [0.02, 0.2],
                         "test": [0.1]}[arg]
  config.ppo_steps = {"full": 30, "quick": 8, "test": 2}[arg]
  config.ppo_eval_every = {"full": 10, "quick": 4, "test": 1}[arg]
  config.bon_ns = {"full": [1, 2, 4, 8, 16, 32], "quick": [1, 4, 16], "test": [1, 2, 4]}[arg]
  return config
