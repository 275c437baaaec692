"""What a Hugging Face checkpoint holds, and what a conversion would make of it.

`describe_checkpoint(hf_dir)` reads only the safetensors headers and config.json (no weights)
and returns a report: the family and architecture, file count, total parameters and dtypes,
the model config we would build, then one line per tensor (per-layer tensors folded into one
line with `{i}` and a layer count) with the param it fills, or why it is skipped:

    model.layers.{i}.self_attn.q_proj.weight  x2  (32, 32)  F32  -> blocks/layers/attn/q
    lm_head.weight                                (96, 32)  F32  -> tied to embed (not read)

and at the end the heads that would start fresh (a base model) and anything that stops the
conversion (tensors with no place, tensors the table needs that the files lack). It is
`python -m scripts.convert --inspect DIR`.
"""

from __future__ import annotations

import collections
import math
import re

from models.build import build_model_spec
from models.convert import heads, layout
from models.convert.absent_heads import absent_head_maps, head_of
from models.convert.errors import ConversionError
from models.convert.hf_import import (_resolve_names, body_maps, check_kind, hf_model_config,
                                      read_hf_config)
from models.convert.registry import family_for_hf
from models.convert.safetensors_io import HFReader

_LAYER = re.compile(r"\.(\d+)\.")
_CONFIG_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "mlp_dim", "norm", "position", "activation", "tie_embeddings")


def _fold(name: str) -> tuple[str, int | None]:
  """`model.layers.3.mlp.up.weight` -> (`model.layers.{i}.mlp.up.weight`, 3)."""
  match = _LAYER.search(name)
  if not match:
    return name, None
  return name[:match.start()] + ".{i}." + name[match.end():], int(match.group(1))


def _targets(hf_dir: str, hf_config: dict, names: list[str], kind: str | None):
  """(header lines, {file name: target text}, closing lines) for a supported family."""
  family = family_for_hf(hf_config)
  kind = kind or heads.kind_of_hf(hf_config, family.kind)
  check_kind(family, kind)
  cfg = hf_model_config(hf_dir, hf_config)
  spec = build_model_spec(cfg, kind)
  maps = body_maps(family, cfg, kind) + heads.head_maps(kind, spec.shapes)
  fields = ", ".join(f"{k}={cfg[k]}" for k in _CONFIG_FIELDS)
  header = [f"family: {family.name} -> our {kind} model ({fields})"]
  resolved = _resolve_names(_Names(names), family)          # canonical -> name in the files
  absent = absent_head_maps(maps, family, resolved)
  targets, missing = {}, []
  for m in maps:
    if m in absent:
      continue
    for layer in (range(cfg.num_layers) if m.per_layer else [None]):
      hf_names = layout.hf_names(m, layer)
      ours = ", ".join("/".join(layout.leaf_path(m, j, None, True)) for j in range(len(m.ours)))
      for name in hf_names:
        if name in resolved:
          targets[resolved[name]] = ours
        else:
          missing.append(name)
  mapped_heads = {head_of(family, n) for m in maps for n in m.hf}
  for canonical, name in resolved.items():
    if name in targets:
      continue
    if canonical == "lm_head.weight" and cfg.tie_embeddings and heads.has_lm_head(kind):
      targets[name] = "tied to embed (not read)"
    elif family.ignored(canonical):
      targets[name] = "ignored (not used by our model)"
    elif head_of(family, canonical) not in (None, *mapped_heads):
      targets[name] = f"dropped (no place in a {kind} model)"
    else:
      targets[name] = "NO PLACE: the conversion stops here"
  footer = [f"absent head, initialised fresh: {', '.join(n for m in absent for n in m.hf)} -> "
            f"{', '.join('/'.join(p) for m in absent for p in m.ours)}"] if absent else []
  if missing:
    footer.append(f"MISSING ({len(missing)}): {missing[:8]}: the conversion stops here")
  return header, targets, footer


class _Names:
  """The `keys()` of a reader, for `_resolve_names` on header-only data."""

  def __init__(self, names: list[str]):
    self._names = names

  def keys(self) -> list[str]:
    return self._names


def describe_checkpoint(hf_dir: str, kind: str | None = None) -> str:
  """The report described in the module docstring, as text.

  Raises:
    ConversionError: no readable config.json or safetensors in `hf_dir`.
  """
  hf_config = read_hf_config(hf_dir)
  with HFReader(hf_dir) as reader:
    names = reader.keys()
    info = {n: reader.info(n) for n in names}
    files = {reader.file_of(n) for n in names}
  total = sum(math.prod(shape) for shape, _ in info.values())
  dtypes = collections.Counter(dtype for _, dtype in info.values())
  lines = [f"{hf_dir}: {hf_config.get('model_type')!r} "
           f"{'/'.join(hf_config.get('architectures') or ['(no architectures)'])}, "
           f"{len(names)} tensors in {len(files)} file(s), {total:,} parameters "
           f"({', '.join(f'{d} {c}' for d, c in sorted(dtypes.items()))})"]
  try:
    header, targets, footer = _targets(hf_dir, hf_config, names, kind)
  except (ConversionError, ValueError) as e:
    header, targets, footer = [f"does not convert: {e}"], {}, []
  lines += header
  groups: dict[str, list] = {}
  for name in names:
    folded, _ = _fold(name)
    groups.setdefault(folded, []).append(name)
  rows = []
  for folded, members in groups.items():
    shapes = {info[n] for n in members}
    shape, dtype = next(iter(shapes)) if len(shapes) == 1 else ("(varies)", "")
    count = f"x{len(members)}" if len(members) > 1 else ""
    target = " | ".join(sorted({targets.get(n, "?") for n in members}))
    rows.append((folded, count, str(shape), dtype, f"-> {target}"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else []
  lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths + [0])).rstrip() for r in rows]
  return "\n".join(lines + footer) + "\n"
