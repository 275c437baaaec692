"""Chinchilla's scaling law on the tiny corpus: Hoffmann et al. (2022), "Training
Compute-Optimal Large Language Models", approach 3 (sec. 3.3, Table 2 / Fig. 4).

Claim reproduced: the final loss of a model of N parameters trained on D tokens follows
L(N, D) = E + A / N^alpha + B / D^beta; the paper fits E 1.69, A 406.4, B 410.7, alpha 0.34,
beta 0.28, so the compute-optimal model grows as N_opt ~ C^a with a = beta / (alpha + beta)
= 0.46 (0.54 for tokens): parameters and tokens should grow about equally with compute.

  python -m scripts.reproduce chinchilla --workdir runs/chinchilla           # 5 x 4 runs
  python -m scripts.reproduce chinchilla --workdir runs/chinchilla_q --quick  # 3 x 3, minutes

Each (model size, token count) pair is one pretraining run of configs/pretrain.py:tiny
(`{workdir}/runs/d{d_model}_s{steps}`), its cosine schedule matched to its own length as the
paper insists; N counts non-embedding parameters, D the tokens trained on (steps x batch x
sequence length); L is the held-out loss at the end. The fit minimises the Huber loss
(delta 1e-3) of log L over a grid of L-BFGS starts, as the paper's approach 3. The report
(`{workdir}/report.html`) has the points and fitted curves, the coefficients beside the
paper's, the compute-optimal N for the largest run's compute, and every run's residual.
"""

import ml_collections

# Paper's approach-3 fit (Hoffmann et al., 2022, eq. 10 and Table 2).
PAPER = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, a=0.46)


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  """`full`, `quick` (under 10 minutes on 2 CPU cores) or `test` (the test suite's grid)."""
  config = ml_collections.ConfigDict()
  config.base = "configs/pretrain.py:tiny"
  # Model sizes as (d_model, num_layers); heads of 16 dims, SwiGLU 3 x d_model.
  sizes = {"full": [(32, 2), (48, 2), (64, 3), (96, 3), (128, 4)],
           "quick": [(32, 2), (64, 2), (128, 3)],
           "test": [(16, 1), (32, 1), (48, 1)]}
  steps = {"full": [100, 200, 400, 800], "quick": [60, 120, 240], "test": [8, 16]}
  if arg not in sizes:
    raise ValueError(f"unknown preset {arg!r}: full, quick, test")
  config.sizes = [list(s) for s in sizes[arg]]
  config.steps = steps[arg]
  config.global_batch_size = 16 if arg != "test" else 8
  config.seq_len = 128 if arg != "test" else 32
  config.lr = 3e-3
  config.eval_steps = 8 if arg != "test" else 2
  config.train_docs = {"full": 20_000, "quick": 4_000, "test": 300}[arg]
  config.huber_delta = 1e-3
  return config
