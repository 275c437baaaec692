"""MLM, continued pretraining and distillation end to end on shrunken tiny configs.

One short pretraining run (the CPT init and the distillation teacher), then one short run of
each stage through `train_and_evaluate`, checking what each stage exists to report.
"""

import json
import os

import numpy as np
import pytest

from configs import cpt, distill, mlm, pretrain
from training.loop import train_and_evaluate
from training.metrics import read_metrics
from training.registry import get_stage

VOCAB = 384


def shrink(config, steps=4):
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                           vocab_size=VOCAB))
  config.data.update(dict(tiny_world_train_docs=300, tiny_world_eval_docs=30, seq_len=32,
                          global_batch_size=8, tokenizer_vocab_size=VOCAB))
  config.train.update(dict(steps=steps, log_every=2, eval_every=steps, eval_steps=2))
  config.checkpoint.update(dict(every_steps=steps, max_to_keep=1))
  config.optimizer.update(dict(warmup_steps=2, lr=1e-2))
  return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 4-step pretraining run: the init of CPT and the teacher of distillation."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  final = train_and_evaluate(shrink(pretrain.get_config("tiny")), workdir)
  return workdir, final


def test_registered_stages():
  assert get_stage("mlm").model_kind == "encoder"
  assert get_stage("distill").model_kind == "decoder"


def test_mlm(tmp_path):
  config = shrink(mlm.get_config("tiny"), steps=6)
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))  # the encoder's params shard
  workdir = str(tmp_path)
  final = train_and_evaluate(config, workdir)
  records = read_metrics(workdir)
  assert records[-1]["train/loss"] < records[0]["train/loss"]
  assert 0.12 < final["eval/mask_rate"] < 0.18
  assert 0.0 <= final["eval/masked_accuracy"] <= 1.0
  assert np.isfinite(final["eval/loss"])


def test_cpt_starts_from_pretrain_and_reports_both_corpora(pretrained, tmp_path):
  pt_dir, pt_final = pretrained
  config = shrink(cpt.get_config("tiny"))
  config.init_from = pt_dir
  config.data.replay_weight = 0.25
  workdir = str(tmp_path)
  # The tokenizer follows init_from: the pretraining run's, not one trained on the chronicle.
  assert config.data.tokenizer == os.path.join(pt_dir, "tokenizer", "spm.model")
  final = train_and_evaluate(config, workdir)
  with open(os.path.join(pt_dir, "tokenizer", "spm.model"), "rb") as a, \
       open(os.path.join(workdir, "tokenizer", "spm.model"), "rb") as b:
    assert a.read() == b.read()
  records = read_metrics(workdir)
  # Fresh optimizer and schedule: step counting restarts at 0, so the first logged lr is the
  # mean of the warmup's first two values, 0 and lr / 2.
  assert records[0]["step"] == 2
  assert records[0]["train/lr"] == pytest.approx(config.optimizer.lr / 4, rel=1e-5)
  # "Before": the init params on the original corpus are exactly the pretraining run's final
  # held-out loss (same params, data, tokenizer and eval batches).
  assert final["eval_replay_init/loss"] == pytest.approx(pt_final["eval/loss"], rel=1e-5)
  for key in ("eval/loss", "eval_replay/loss", "eval_init/loss"):
    assert np.isfinite(final[key])
  # The new domain is learned: its held-out loss goes down from the init's.
  assert final["eval/loss"] < final["eval_init/loss"]


def test_distill_with_a_larger_teacher(pretrained, tmp_path):
  pt_dir, pt_final = pretrained
  config = shrink(distill.get_config("tiny"))
  config.model.update(dict(d_model=16, num_layers=1, mlp_dim=32))  # smaller than the teacher
  config.objective.update(dict(teacher=pt_dir, divergence="jsd", beta=0.5, temperature=2.0,
                               ce_weight=0.1))
  workdir = str(tmp_path)
  final = train_and_evaluate(config, workdir)
  # The teacher is the pretraining run, architecture from its config.json: its held-out nll
  # is that run's final eval loss.
  assert final["eval/teacher_nll"] == pytest.approx(pt_final["eval/loss"], rel=1e-5)
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["d_model"] == 16
  assert 0.0 < final["eval/divergence"] < np.log(2)  # JSD(0.5) is at most log 2
  records = read_metrics(workdir)
  assert records[-1]["train/loss"] < records[0]["train/loss"]


def test_distill_errors(tmp_path):
  config = distill.get_config("tiny")
  config.objective.teacher = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    get_stage("distill").frozen_models(config)
  (tmp_path / "config.json").write_text(json.dumps({"model": dict(config.model.to_dict(),
                                                                   vocab_size=1000)}))
  with pytest.raises(ValueError, match="vocab_size"):
    get_stage("distill").frozen_models(config)
