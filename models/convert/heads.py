"""Scalar heads (reward model, value model) as table entries on top of a family's body.

HF's `*ForSequenceClassification` is the body plus `score.weight [num_labels, d_model]`, a
bias-free nn.Linear read at the last non-padding token. Here a head kind maps that tensor to
one param of our model of that kind, `[d_model, 1]` (models/heads.py `RewardModel.score`,
a `ScalarHead` without bias); the body's tensors map as for the LM (`lm_head` is absent from
both sides). A new head is one entry in `HEAD_PARAMS`.
"""

from __future__ import annotations

from typing import Any

from models.convert.families import TensorMap

# Our model kind -> path of its head kernel `[d_model, num_labels]` (num_labels = 1).
HEAD_PARAMS: dict[str, tuple[str, ...]] = {
    "reward": ("score", "kernel"),
}
SCORE_TENSOR = "score.weight"


def head_maps(kind: str, shapes: Any) -> list[TensorMap]:
  """The head's table entries for our model `kind` (none for an LM or encoder)."""
  if kind not in HEAD_PARAMS:
    return []
  path = HEAD_PARAMS[kind]
  node = shapes
  for key in path:
    if key not in node:
      raise ValueError(f"model kind {kind!r} has no head param {'/'.join(path)}; update "
                       "models/convert/heads.py HEAD_PARAMS")
    node = node[key]
  return [TensorMap((SCORE_TENSOR,), (path,), "linear", 1, per_layer=False)]


def has_lm_head(kind: str) -> bool:
  return kind not in HEAD_PARAMS


def kind_of_hf(hf_config: dict[str, Any], lm_kind: str = "decoder") -> str:
  """Our model kind for an HF config: "reward" for a one-label sequence classifier on a
  decoder family, else the family's LM kind `lm_kind` ("decoder", or "encoder" for BERT)."""
  architectures = hf_config.get("architectures") or []
  if any(a.endswith("ForSequenceClassification") for a in architectures):
    if lm_kind != "decoder":
      raise ValueError(f"{architectures[0]}: only the masked-LM model of an encoder family "
                       "converts (its scalar heads sit on a decoder here)")
    labels = len(hf_config.get("id2label") or {0: "LABEL_0"})
    if labels != 1:
      raise ValueError(f"sequence classifier with {labels} labels: only a scalar head "
                       "(num_labels=1, a reward or value model) converts")
    return "reward"
  return lm_kind


def hf_head_fields(kind: str, architecture: str) -> dict[str, Any]:
  """config.json fields of the HF class for our `kind` (`architecture` is the LM class)."""
  if kind not in HEAD_PARAMS:
    return dict(architectures=[architecture])
  base = architecture.replace("ForCausalLM", "").replace("LMHeadModel", "")
  return dict(architectures=[f"{base}ForSequenceClassification"],
              id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
