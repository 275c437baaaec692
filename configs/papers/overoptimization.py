"""Reward-model over-optimisation on the tiny world: Gao, Schulman & Hilton (2023), "Scaling
Laws for Reward Model Overoptimization", sec. 3 (eq. 1-2, Fig. 1).

Claim reproduced: optimising a learned (proxy) reward model raises the proxy score steadily
while the gold reward first rises and then falls, as functions of d = sqrt(KL(pi || pi_init)):

  best-of-N   R_gold(d) = d (alpha_bon - beta_bon d)          (peaks at d* = alpha / (2 beta))
  RL          R_gold(d) = d (alpha_RL - beta_RL log d)        (peaks at d* = exp(alpha / beta - 1))

with R measured from the initial policy's value (R(0) = 0). The paper's 1.2B-parameter proxy
peaks at KL of a few nats for RL and tens of nats for best-of-N, and fits its forms well.

  python -m scripts.reproduce overoptimization --workdir runs/overopt
  python -m scripts.reproduce overoptimization --workdir runs/overopt_q --quick
  python -m scripts.reproduce overoptimization --workdir runs/overopt_2 \\
      --base_runs runs/dpo_frontier/base      # reuse the pretrain / SFT / reward-model runs

The proxy is the tiny world's reward model (`{workdir}/base/reward`, Bradley-Terry on its
preference pairs) and the gold reward its verifiable answer check. Best-of-N: a pool of
max(`bon_ns`) sampled replies per held-out question from the SFT policy, each N taking the
reply the proxy scores highest in disjoint groups of N (KL = log N - (N - 1) / N). RL:
configs/grpo.py:tiny against the proxy alone (no KL penalty, no missing-stop penalty, as
the paper's main runs), every held-out evaluation along training a point (gold:
`eval/sampled_answer_accuracy`, proxy: `eval/sampled_reward`, KL: `eval/sampled_kl`,
training/rl/evaluation.py). Fits: least squares of the gold gain over the initial policy's
(both forms are linear in alpha and beta).
"""

import ml_collections

from configs.papers.dpo_frontier import add_base_runs

PAPER = dict(figure="Gao, Schulman & Hilton 2023, Fig. 1 and eq. 1-2",
             claim="gold reward rises then falls against d = sqrt(KL) while the proxy keeps "
                   "rising; best-of-N follows d (alpha - beta d), RL d (alpha - beta log d)")


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  """`full` (17 minutes on a heavily shared 2-core machine with `--base_runs`, plus the
  base chain's training without), `quick` (minutes) or `test` (the test suite's)."""
  config = ml_collections.ConfigDict()
  add_base_runs(config, arg)
  config.bon_ns = {"full": [1, 2, 4, 8, 16, 32, 64], "quick": [1, 2, 4, 8, 16],
                   "test": [1, 2, 4]}[arg]
  # RL against the proxy: iterations, evaluation period (each evaluation is a point) and a
  # learning rate high enough to travel far from the SFT policy.
  config.rl_steps = {"full": 60, "quick": 12, "test": 2}[arg]
  config.rl_eval_every = {"full": 6, "quick": 3, "test": 1}[arg]
  config.rl_lr = {"full": 1e-4, "quick": 2e-4, "test": 1e-4}[arg]
  return config
