"""Sequence log-probs of every preference example in a split, and the reference cache.

Reference-based DPO-family losses (and KTO) need log pi_ref(y|x) of each sequence. The
reference never changes, so instead of a reference forward pass in every step, the stage's
`prepare` runs it once over the train and eval examples before training and keeps one number
per sequence, keyed by the example's index in its split:

    {workdir}/reference_logps/{split}.npz
        logps        [N, 2] float32: example i's first and second sequence (chosen / rejected,
                     or KTO's completion / mismatched completion)
        fingerprint  sha256 of every example's encoded tokens and of the reference params

The data pipeline (data/preferences.py) puts each segment's cached value on its tokens
(`reference_logps`), so the train step runs the policy alone and the reference is not even
held in memory while training.

Resume: a restarted run re-encodes the examples, restores the reference, recomputes the
fingerprint and finds the file valid, so it skips the pass; the data iterator's saved state
only holds positions in the example stream, and the cached values are a pure function of the
example index, so resumed batches are the ones an uninterrupted run would have seen. A changed
dataset, tokenizer, seq_len, template or reference changes the fingerprint and recomputes.

Multi-host: every process reads the whole split in the same order and feeds the rows of each
global batch that its devices hold; the per-example outputs come back replicated, so every
process assembles the whole table. The primary process writes the file, and all processes
meet at a barrier before any data pipeline reads it (the workdir is shared, as it is for
checkpoints).
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Callable, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from models.build import ModelSpec
from objectives.clm import token_log_probs
from objectives.pairs import (PairSequences, pair_mask, segment_last, sequence_log_probs,
                              split_pairs)
from parallel.host_data import process_rows
from parallel.rules import batch_sharding, tree_shardings, use_mesh_rules

CACHE_DIR = "reference_logps"


def pair_log_probs(model, batch: dict[str, jax.Array]) -> PairSequences:
  """Summed completion log-probs of both sequences of every example slot, `[batch, P]` each.

  `model` is a decoder (policy or reference); `batch` a packed preference batch.
  """
  logits = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  return sequence_log_probs(token_log_probs(logits, batch["targets"]), batch["loss_mask"],
                            batch["segment_ids"])


def make_pair_log_probs_fn(spec: ModelSpec, mesh, rules) -> Callable:
  """Jitted `(params, global batch) -> {first, second, example_ids, valid}`, `[batch, P]`
  arrays replicated on every device (so every process can read all of them)."""
  def forward(params, batch):
    with use_mesh_rules(mesh, rules):
      seqs = pair_log_probs(spec.bind(params), batch)
      ids, _ = split_pairs(segment_last(batch["example_ids"], batch["segment_ids"]))
      return {"first": seqs.first, "second": seqs.second, "example_ids": ids,
              "valid": pair_mask(batch["sides"], batch["segment_ids"])}
  params_sharding = tree_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  return jax.jit(forward, in_shardings=(params_sharding, batch_sharding(mesh, rules)),
                 out_shardings=NamedSharding(mesh, P()))


def split_table(forward: Callable, params: Any, batches: Iterable[dict[str, np.ndarray]],
                num_examples: int, *, mesh, rules, global_batch: int) -> np.ndarray:
  """Runs `forward` over `batches` (every process: the whole split, same order) and returns
  `[num_examples, 2]` float32 log-probs indexed by example id.

  Raises:
    ValueError: an example never appeared in `batches`.
  """
  sharding = batch_sharding(mesh, rules)
  start, stop = process_rows(sharding, global_batch)
  table = np.full((num_examples, 2), np.nan, np.float32)
  for batch in batches:
    arrays = {k: jax.make_array_from_process_local_data(sharding, v[start:stop],
                                                        (global_batch,) + v.shape[1:])
              for k, v in batch.items()}
    out = jax.device_get(forward(params, arrays))
    valid = out["valid"]
    ids = out["example_ids"][valid]
    table[ids, 0] = out["first"][valid]
    table[ids, 1] = out["second"][valid]
  missing = np.flatnonzero(np.isnan(table[:, 0]))
  if len(missing):
    raise ValueError(f"{len(missing)} examples (first: {missing[:5].tolist()}) got no "
                     "log-prob; were they all in the batches?")
  return table


def params_checksum(params: Any) -> str:
  """Shapes and bit-pattern sums of every leaf: tells two sets of weights apart.

  Each leaf's float32 bit patterns are summed as uint32 (mod 2^32): integer addition is
  associative, so the sum is the same on any mesh and sharding (a float sum is not).
  """
  leaves = jax.tree_util.tree_leaves_with_path(params)
  bits = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  sums = jax.jit(lambda ls: [jnp.sum(bits(x), dtype=jnp.uint32) for x in ls])(
      [x for _, x in leaves])
  text = ";".join(f"{jax.tree_util.keystr(p)}{tuple(x.shape)}:{int(s)}"
                  for (p, x), s in zip(leaves, jax.device_get(sums)))
  return hashlib.sha256(text.encode()).hexdigest()


def units_fingerprint(encode: Callable[[int], list], num_examples: int) -> Any:
  """sha256 over every example's encoded unit (tokens, masks, fields), in index order."""
  digest = hashlib.sha256()
  for index in range(num_examples):
    for segment in encode(index):
      for key in sorted(segment):
        if key != "reference_logps":
          digest.update(key.encode())
          digest.update(np.ascontiguousarray(segment[key]).tobytes())
  return digest


class ReferenceCache:
  """The `[N, 2]` tables of one run, under `{workdir}/reference_logps/`."""

  def __init__(self, workdir: str):
    self.directory = os.path.join(workdir, CACHE_DIR)

  def path(self, name: str) -> str:
    return os.path.join(self.directory, f"{name}.npz")

  def fingerprint(self, name: str) -> str | None:
    if not os.path.exists(self.path(name)):
      return None
    with np.load(self.path(name)) as data:
      return str(data["fingerprint"])

  def save(self, name: str, table: np.ndarray, fingerprint: str) -> None:
    """Writes atomically on the primary process; every process then waits at a barrier."""
    if jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      tmp = f"{self.path(name)}.tmp{os.getpid()}.npz"
      np.savez(tmp, logps=table, fingerprint=np.asarray(fingerprint))
      os.replace(tmp, self.path(name))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"reference_cache/{name}")
    logging.info("reference log-probs of %d examples cached in %s", len(table), self.path(name))

  def load(self, name: str) -> np.ndarray:
    """The cached table; raises FileNotFoundError naming the file if `prepare` never ran."""
    path = self.path(name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no cached reference log-probs (the stage's prepare "
                              "step computes them before training)")
    return _load_table(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=8)
def _load_table(path: str, mtime: float) -> np.ndarray:
  del mtime  # cache key only: a rewritten table is read again
  with np.load(path) as data:
    return np.asarray(data["logps"], np.float32)
