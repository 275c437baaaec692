"""Task heads (reward / value scores, sequence classifiers) as table entries on a family's body.

HF's `*ForSequenceClassification` is the body plus a head read at one token per sequence:

    decoder families  `score.weight [num_labels, d_model]`, a bias-free nn.Linear read at the
                      last non-padding token: our "reward" kind (num_labels = 1, models/heads.py
                      `RewardModel.score` `[d_model, 1]`) or "classifier" (`SequenceClassifier.
                      score` `[d_model, num_labels]`)
    BERT              `bert.pooler.dense` (tanh) then `classifier [num_labels, d_model]` + bias,
                      read at [CLS]: our "encoder_classifier" (`EncoderClassifier.pooler`,
                      `.classifier`)

The body's tensors map as for the LM, without its LM head (`lm_head`, or BERT's `cls.`
predictions: `LM_HEAD_PARAMS`). A new head is one entry in `HEAD_MAPS`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import ml_collections

from models.convert.families import ENCODER_KINDS, TensorMap

SCORE_TENSOR = "score.weight"
# Our params of an LM head: the decoder's untied `lm_head`, the encoder's MLM head.
LM_HEAD_PARAMS = ("lm_head", "head_dense", "head_bias", "head_norm", "output_bias")
# Kinds with a sequence-classification head of `config.model.num_labels` outputs.
CLASSIFIER_KINDS = ("classifier", "encoder_classifier")


def _score(shapes: Any) -> list[TensorMap]:
  return [TensorMap((SCORE_TENSOR,), (("score", "kernel"),), "linear", 1, per_layer=False)]


def _bert_classifier(shapes: Any) -> list[TensorMap]:
  maps = []
  if "pooler" in shapes:
    maps += [TensorMap(("bert.pooler.dense.weight",), (("pooler", "kernel"),), "linear", 1,
                       per_layer=False),
             TensorMap(("bert.pooler.dense.bias",), (("pooler", "bias"),), "copy", 0,
                       per_layer=False)]
  return maps + [
      TensorMap(("classifier.weight",), (("classifier", "kernel"),), "linear", 1,
                per_layer=False),
      TensorMap(("classifier.bias",), (("classifier", "bias"),), "copy", 0, per_layer=False)]


# Our model kind -> its head's table entries, given our param shapes.
HEAD_MAPS: dict[str, Callable[[Any], list[TensorMap]]] = {
    "reward": _score, "classifier": _score, "encoder_classifier": _bert_classifier}


def head_maps(kind: str, shapes: Any) -> list[TensorMap]:
  """The head's table entries for our model `kind` (none for an LM or encoder)."""
  if kind not in HEAD_MAPS:
    return []
  maps = HEAD_MAPS[kind](shapes)
  for m in maps:
    node = shapes
    for key in m.ours[0]:
      if key not in node:
        raise ValueError(f"model kind {kind!r} has no head param {'/'.join(m.ours[0])}; "
                         "update models/convert/heads.py HEAD_MAPS")
      node = node[key]
  return maps


def has_lm_head(kind: str) -> bool:
  return kind not in HEAD_MAPS


def is_lm_head(m: TensorMap) -> bool:
  """Whether a family table entry fills an LM head (dropped for head kinds)."""
  return any(path[0] in LM_HEAD_PARAMS for path in m.ours) and not m.per_layer


def hf_num_labels(hf_config: dict[str, Any]) -> int:
  """Labels of an HF config: its id2label, else `num_labels`, else HF's default 2."""
  return len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 2))


def kind_of_hf(hf_config: dict[str, Any], lm_kind: str = "decoder") -> str:
  """Our model kind for an HF config: a `*ForSequenceClassification` is "reward" with one
  label on a decoder family (a scalar reward / value head), "classifier" with more, and
  "encoder_classifier" on BERT; anything else the family's LM kind `lm_kind`."""
  architectures = hf_config.get("architectures") or []
  if any(a.endswith("ForSequenceClassification") for a in architectures):
    if lm_kind in ENCODER_KINDS:
      return "encoder_classifier"
    return "reward" if hf_num_labels(hf_config) == 1 else "classifier"
  return lm_kind


def head_config(hf_config: dict[str, Any], kind: str,
                num_labels: int | None = None) -> dict[str, Any]:
  """`config.model` fields of our `kind`'s head: a classifier's `num_labels` (given, else the
  HF config's) and, on BERT, `classifier_pooler` (BertForSequenceClassification has one)."""
  if kind not in CLASSIFIER_KINDS:
    return {}
  fields = dict(num_labels=int(num_labels or hf_num_labels(hf_config)))
  fields["classifier_pooler"] = kind == "encoder_classifier"
  return fields


def hf_head_fields(kind: str, architecture: str, model_cfg: ml_collections.ConfigDict,
                   label_names: Sequence[str] = ()) -> dict[str, Any]:
  """config.json fields of the HF class for our `kind` (`architecture` is the LM class):
  the architecture and, for a head, its labels (`label_names` when given, else LABEL_i)."""
  if kind not in HEAD_MAPS:
    return dict(architectures=[architecture])
  base = (architecture.replace("ForCausalLM", "").replace("LMHeadModel", "")
          .replace("ForMaskedLM", ""))
  num = int(model_cfg.get("num_labels", 1)) if kind in CLASSIFIER_KINDS else 1
  if kind == "encoder_classifier" and not model_cfg.get("classifier_pooler", False):
    raise ValueError("BertForSequenceClassification has a pooler: export needs "
                     "config.model.classifier_pooler=True")
  names = list(label_names) if len(label_names) == num else [f"LABEL_{i}" for i in range(num)]
  fields = dict(architectures=[f"{base}ForSequenceClassification"],
                id2label={str(i): n for i, n in enumerate(names)},
                label2id={n: i for i, n in enumerate(names)})
  if kind in CLASSIFIER_KINDS:
    fields["problem_type"] = "regression" if num == 1 else "single_label_classification"
  return fields
