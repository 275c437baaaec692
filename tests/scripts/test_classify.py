"""scripts/classify.py around the model: --help, refusing a run that holds no classifier, and
the output line of a prediction (labelling a file end to end: tests/training/
test_classify_stage.py)."""

import subprocess
import sys

import numpy as np
import pytest

from configs import classify as classify_config
from configs import pretrain as pretrain_config
from configs.run_layout import write_run_config
from data.classify import LabelSpec, Labelled
from scripts.classify import load_classifier, prediction_line


def test_help():
  result = subprocess.run([sys.executable, "-m", "scripts.classify", "--help"],
                          capture_output=True, text=True, timeout=120)
  # absl's --help exits with status 1 after printing the usage (as every script here does).
  assert result.returncode in (0, 1) and "Traceback" not in result.stderr
  for flag in ("--workdir:", "--input:", "--output:", "--text_pair_field:"):
    assert flag in result.stdout


def test_a_run_without_a_classifier_is_refused(tmp_path):
  write_run_config(str(tmp_path), pretrain_config.get_config("tiny"), "decoder")
  with pytest.raises(ValueError, match="holds a 'decoder' model, not a classifier"):
    load_classifier(str(tmp_path))


def test_prediction_lines():
  data = classify_config.get_config("mnli_bert").data
  labels = LabelSpec.from_config(data, 3, "classification")
  logits = np.log(np.array([0.2, 0.7, 0.1], np.float32))
  line = prediction_line({"premise": "a", "hypothesis": "b", "label": 1},
                         Labelled("a", "b"), logits, labels, data)
  assert line["label"] == "neutral" and line["label_id"] == 1 and line["reference"] == 1
  assert line["text_b"] == "b"
  np.testing.assert_allclose([line["probabilities"][n] for n in labels.names], [0.2, 0.7, 0.1],
                             rtol=1e-5)
  regression = LabelSpec(1, regression=True)
  line = prediction_line({"sentence1": "a"}, Labelled("a"), np.array([3.5]), regression, data)
  assert line == {"text": "a", "prediction": 3.5}
