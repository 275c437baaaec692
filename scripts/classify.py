r"""Label a file of texts with a classifier run's latest checkpoint.

  python -m scripts.classify --workdir runs/classify_tiny --input texts.jsonl \
      --output labels.jsonl [--batch_size 16 --text_field text --text_pair_field '']

Input: JSONL (or a .json array, .parquet), one example per line in the run's record format
(docs/formats.md, "Labelled examples"): the text in the run's `config.data.text_field` (and
`text_pair_field` for pairs), a label optional. A bad line is an error naming file:line.
Output: one JSON line per input line, in input order,

  {"text": ..., ["text_b": ...,] "label": "positive", "label_id": 1,
   "probabilities": {"negative": 0.08, "positive": 0.92}[, "reference": <the input's label>]}

or, for a regression run, `"prediction": 3.71` instead of the label fields. Label names are
the run's `config.data.label_names` (else the ids as text).

The run (a classify run, or a converted *ForSequenceClassification) is loaded by
training/runs.py on its own mesh, with its tokenizer and framing (data/classify.py: [CLS] /
[SEP] for an encoder, the last token for a decoder, `seq_len` truncation). The output appears
only when complete: a failed run leaves an earlier one as it was.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags, logging

from configs.cli import parse_flags
from configs.run_layout import read_run_config
from data.classify import LabelSpec, labelled_parser, make_classify_dataset
from data.records import RecordError, iter_jsonl_records
from parallel.host_data import batch_shards, to_global
from training.runs import LoadedModel, load_model, run_model_kind
from training.stages.classify import Predictor

FLAGS = flags.FLAGS
# Model kind -> body (data/classify.py BODIES).
BODIES = {"classifier": "decoder", "encoder_classifier": "encoder"}


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Classifier run to load (its latest checkpoint).")
  flags.DEFINE_string("input", None, "JSONL file of examples to label.")
  flags.DEFINE_string("output", None, "Where to write the labels (JSONL).")
  flags.DEFINE_integer("batch_size", 0, "Rows per batch (0: the run's global batch size).")
  flags.DEFINE_string("text_field", "", "Field of the text ('': the run's).")
  flags.DEFINE_string("text_pair_field", None, "Field of a pair's second text (default: the "
                      "run's; '' for single texts).")


def load_classifier(workdir: str) -> LoadedModel:
  """The run's latest params as its classifier (training/runs.py `load_model`)."""
  kind = run_model_kind(read_run_config(workdir))
  if kind not in BODIES:
    raise ValueError(f"{workdir} holds a {kind!r} model, not a classifier ({' | '.join(BODIES)})")
  return load_model(workdir)


def label_spec_of(config) -> LabelSpec:
  """The run's labels; a converted model without a classify config: by its num_labels."""
  num = int(config.model.num_labels)
  problem = config.objective.get("problem_type", "regression" if num == 1 else "classification")
  return LabelSpec.from_config(config.data, num, problem)


def classify_file(model: LoadedModel, input_path: str, output_path: str, *,
                  batch_size: int = 0, text_field: str = "",
                  text_pair_field: str | None = None) -> int:
  """Writes one prediction per example of `input_path` to `output_path`; returns the count."""
  config = model.config
  with config.unlocked():
    config.data.text_field = text_field or config.data.text_field
    if text_pair_field is not None or "text_pair_field" not in config.data:
      config.data.text_pair_field = text_pair_field or ""
  labels = label_spec_of(config)
  tok = model.tokenizer
  if BODIES[model.kind] == "decoder" and config.data.add_eos and tok.eos_id == tok.pad_id:
    # Only a converted model gets here (training refuses it, data/classify.py): read it as
    # Hugging Face does, at the last token before padding, so no trailing EOS.
    logging.info("the tokenizer pads with its EOS token: texts get no trailing EOS")
    with config.unlocked():
      config.data.add_eos = False
  raw, examples = [], []
  parse = labelled_parser(config.data, labels, require_label=False)
  for obj, example in iter_jsonl_records(input_path, lambda obj: (obj, parse(obj))):
    raw.append(obj)
    examples.append(example)
  if not examples:
    raise ValueError(f"{input_path} holds no examples")
  ways = batch_shards(model.mesh, model.rules)
  rows = batch_size or config.data.global_batch_size
  rows = -(-rows // ways) * ways
  batches = (to_global(batch, model.mesh, model.rules) for batch in make_classify_dataset(
      config.data, tok, examples, body=BODIES[model.kind],
      regression=labels.regression, split="predict", batch_size=rows, shuffle=False))
  ids, outputs, _ = Predictor(model.spec, model.mesh, model.rules)(model.params, batches)
  order = np.argsort(ids, kind="stable")
  ids, outputs = ids[order], outputs[order]
  if not np.array_equal(ids, np.arange(len(examples))):
    raise RuntimeError(f"predicted {len(ids)} outputs for {len(examples)} examples")
  folder = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(output_path)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as out:
      for obj, example, output in zip(raw, examples, outputs):
        out.write(json.dumps(prediction_line(obj, example, output, labels, config.data),
                             ensure_ascii=False) + "\n")
    os.replace(tmp, output_path)
  except BaseException:
    os.remove(tmp)
    raise
  return len(examples)


def prediction_line(obj: dict, example, output: np.ndarray, labels: LabelSpec,
                    data_config) -> dict:
  """The output record of one example (module docstring)."""
  line = {"text": example.text}
  if example.text_b is not None:
    line["text_b"] = example.text_b
  if labels.regression:
    line["prediction"] = float(output[0])
  else:
    probs = np.asarray(jax.nn.softmax(np.asarray(output, np.float32)))
    best = int(probs.argmax())
    line.update(label=labels.name(best), label_id=best,
                probabilities={labels.name(i): round(float(p), 6) for i, p in enumerate(probs)})
  label_field = data_config.get("label_field", "label")
  if label_field in obj:
    line["reference"] = obj[label_field]
  return line


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("workdir", "input", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  logging.set_verbosity(logging.INFO)
  try:
    model = load_classifier(FLAGS.workdir)
    count = classify_file(model, FLAGS.input, FLAGS.output, batch_size=FLAGS.batch_size,
                          text_field=FLAGS.text_field, text_pair_field=FLAGS.text_pair_field)
  except (RecordError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"Wrote {count} predictions to {FLAGS.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
