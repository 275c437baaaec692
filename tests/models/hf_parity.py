"""Shared helpers of the Hugging Face conversion tests (tests/models/test_convert_*.py).

Models are small and randomly initialised by `transformers` from a config (nothing is
downloaded); every weight, norms and biases included, is drawn at random so a wrong mapping
cannot hide behind HF's zero / one initialisations.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

import models  # noqa: F401
from models.build import build_model_spec
from training.checkpoint import Checkpointer

TOL = 1e-4


def run_convert(*args: str) -> subprocess.CompletedProcess:
  """`python -m scripts.convert ARGS` in a fresh process on the CPU; raises if it fails."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "scripts.convert", *args], capture_output=True,
                        text=True, env=env, check=True)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, std)
  return model.eval()


def restore_ours(run_dir: str, model_cfg, kind: str = "decoder"):
  """(spec, params) of a converted run directory, restored onto one device."""
  spec = build_model_spec(model_cfg, kind)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        spec.shapes)
  return spec, Checkpointer.restore_params(run_dir, target)


def our_hidden_or_logits(spec, params, tokens, segment_ids, positions, hidden=False):
  model = spec.bind(params)
  args = (jnp.asarray(tokens),)
  kwargs = dict(positions=jnp.asarray(positions), segment_ids=jnp.asarray(segment_ids))
  out = model.hidden_states(*args, **kwargs) if hidden else model(*args, **kwargs)
  return np.asarray(out)


def hf_logits(model, tokens, attention_mask=None) -> np.ndarray:
  with torch.no_grad():
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    return model(input_ids=torch.tensor(tokens), attention_mask=mask).logits.float().numpy()


def padded_batch(vocab: int, lengths=(12, 8), seed: int = 1):
  """Right-padded rows: (tokens, attention_mask / segment_ids, positions) `[rows, max]`."""
  rng = np.random.default_rng(seed)
  width = max(lengths)
  tokens = rng.integers(1, vocab, (len(lengths), width)).astype(np.int64)
  mask = np.zeros((len(lengths), width), np.int64)
  for row, n in enumerate(lengths):
    mask[row, :n] = 1
    tokens[row, n:] = 0
  positions = np.where(mask > 0, np.arange(width)[None], 0)
  return tokens, mask, positions


def packed_row(vocab: int, lengths=(5, 7), seed: int = 2):
  """One row packing documents of `lengths`: (docs, tokens, segment_ids, positions)."""
  rng = np.random.default_rng(seed)
  docs = [rng.integers(1, vocab, n).astype(np.int64) for n in lengths]
  tokens = np.concatenate(docs)[None]
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  return docs, tokens, segments, positions


def check_padded_parity(hf_model, spec, params, vocab: int) -> float:
  tokens, mask, positions = padded_batch(vocab)
  ref = hf_logits(hf_model, tokens, mask)
  ours = our_hidden_or_logits(spec, params, tokens, mask, positions)
  real = mask > 0
  return float(np.abs(ours[real] - ref[real]).max())


def check_packed_parity(hf_model, spec, params, vocab: int) -> float:
  docs, tokens, segments, positions = packed_row(vocab)
  ours = our_hidden_or_logits(spec, params, tokens, segments, positions)[0]
  ref = np.concatenate([hf_logits(hf_model, d[None])[0] for d in docs])
  return float(np.abs(ours - ref).max())


def assert_same_state_dict(a: torch.nn.Module, b: torch.nn.Module) -> None:
  sa, sb = a.state_dict(), b.state_dict()
  assert set(sa) == set(sb), set(sa) ^ set(sb)
  for name in sa:
    assert sa[name].dtype == sb[name].dtype, name
    assert torch.equal(sa[name], sb[name]), name
