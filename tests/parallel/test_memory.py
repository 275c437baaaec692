"""Remat policies and scanned layers: the same losses, different compiled memory.

Each variant's train step is compiled once ahead of time (scripts/compile_check.py, the path the
benchmark uses for `remat_peak_memory`); that compiled step both trains three steps on one
device and reports its `memory_analysis()`. (Sharded equivalence: test_equivalence.py.)
"""

import jax
import numpy as np
import pytest

from configs import pretrain
from objectives.reductions import finalize_metrics
from scripts.compile_check import device_memory, lower_train_step
from training.state import init_train_state

VARIANTS = [("none", True), ("full", True), ("save_dots", True), ("none", False),
            ("full", False)]


def variant_config(remat, scan):
  config = pretrain.get_config("tiny")
  config.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           mlp_dim=128, max_length=64, remat=remat, scan_layers=scan))
  config.data.update(dict(global_batch_size=8, seq_len=64))
  config.optimizer.update(dict(warmup_steps=1, lr=1e-2))
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return config


def random_batches(n=3, batch=8, length=64, vocab=64):
  rng = np.random.default_rng(1)
  out = []
  for _ in range(n):
    tokens = rng.integers(1, vocab, (batch, length + 1)).astype(np.int32)
    out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                    loss_mask=np.ones((batch, length), np.float32),
                    segment_ids=np.ones((batch, length), np.int32),
                    positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1))))
  return out


def run_variant(remat, scan, initial):
  """Losses of three steps from the scanned model's `initial` state, and compiled memory."""
  config = variant_config(remat, scan)
  lowered, setup = lower_train_step(config, jax.devices()[:1])
  compiled = lowered.compile()
  state = initial
  if not scan:
    # The same weights (and Adam moments), layer i of the stack as block i.
    def unstack(tree):
      layers = tree["blocks"]["layers"]
      return dict(tree, blocks={"layers": {i: jax.tree.map(lambda x, i=i: x[i], layers)
                                           for i in range(config.model.num_layers)}})
    is_model_tree = lambda x: isinstance(x, dict) and "blocks" in x
    state = jax.tree.map(lambda x: unstack(x) if is_model_tree(x) else x, initial,
                         is_leaf=is_model_tree)
  state = jax.device_put(state, jax.tree.map(lambda a: a.sharding, setup.abstract_state))
  losses = []
  for batch in random_batches():
    state, metrics = compiled(state, batch, {})
    losses.append(float(finalize_metrics(metrics)["loss"]))
  return losses, device_memory(compiled)


@pytest.fixture(scope="module")
def results():
  _, setup = lower_train_step(variant_config("none", True), jax.devices()[:1])
  initial = jax.device_get(init_train_state(setup.spec, setup.optimizer,
                                            setup.abstract_state, seed=0))
  return {variant: run_variant(*variant, initial) for variant in VARIANTS}


def test_remat_and_scan_give_the_same_losses(results):
  reference, _ = results[("none", True)]
  assert reference[2] < reference[0]
  for variant, (losses, _) in results.items():
    np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5, err_msg=str(variant))


def test_compiled_memory_is_reported_and_remat_saves_activations(results):
  print({variant: memory for variant, (_, memory) in results.items()})
  for variant, (_, memory) in results.items():
    assert memory["argument"] > 0 and memory["temp"] > 0, variant
    assert memory["total"] == (memory["argument"] + memory["output"] - memory["alias"]
                               + memory["temp"] + memory["code"])
  none, full = results[("none", True)][1], results[("full", True)][1]
  # The state is donated, so every output but the metrics is written into its argument.
  assert none["output"] - none["alias"] < 4096
  # Full remat keeps only each layer's input for the backward pass.
  assert full["temp"] < none["temp"]
