"""The classify stages through the real loop: a decoder and an encoder classifier start from
stand-in pretrained runs, train, save, resume, evaluate (the loop, scripts.evaluate and
scripts.classify agree), and partial fine-tuning leaves frozen params bit-identical with no
optimizer state for them, scanned or unrolled."""

import json
import shutil

import jax
import numpy as np
import pytest

import models  # noqa: F401
from configs import classify as classify_config
from configs.base import base_config
from data import tiny_world
from data.tokenizer import Tokenizer, train_sentencepiece
from models.build import build_model_spec
from scripts.classify import classify_file, load_classifier
from scripts.evaluate import evaluate_run
from scripts.pipeline import stage_plan
from training.checkpoint import Checkpointer
from training.loop import train_and_evaluate
from training.metrics import read_metrics
from training.registry import get_stage
from training.setup import build_setup
from training.trainable import trainable_parts

VOCAB = 384
LAYERS = 3


def shrink(config, base_dir, *, scan=True, steps=3):
  config.init_from = base_dir
  config.model.update(dict(d_model=32, num_layers=LAYERS, num_heads=4, num_kv_heads=2,
                           mlp_dim=64, vocab_size=VOCAB, scan_layers=scan))
  config.data.update(dict(tiny_task_train_records=200, tiny_task_eval_records=24, seq_len=48,
                          global_batch_size=8, tokenizer_vocab_size=VOCAB, pack_bins=4))
  config.train.update(dict(steps=steps, log_every=1, eval_every=steps, eval_steps=8))
  config.checkpoint.update(dict(every_steps=100, async_save=False))
  config.optimizer.update(dict(warmup_steps=1, lr=1e-2))
  return config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizer")
  train_sentencepiece(tiny_world.generate_documents("train", 1500), str(root / "spm"), VOCAB)
  return root


def _base_run(root, tokenizer_dir, kind, scan=True):
  """A stand-in pretrained run: the tokenizer and random params of the classifier's body."""
  shutil.copytree(tokenizer_dir, root / "tokenizer")
  config = shrink(classify_config.get_config("tiny"), str(root), scan=scan)
  spec = build_model_spec(config.model, kind)
  with Checkpointer(str(root / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(10, {"params": spec.init(jax.random.PRNGKey(7))}, force=True)
  return str(root)


def _params(run, config, kind):
  spec = build_model_spec(config.model, kind)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        spec.shapes)
  return Checkpointer.restore_params(run, target)


def test_decoder_classifier_trains_resumes_evaluates_and_freezes(tokenizer_dir, tmp_path):
  """top 1 of 3 scanned layers (+ final norm + head) trains; stopped at step 2 and resumed;
  the loop, scripts.evaluate and scripts.classify agree; frozen params are bit-identical and
  have no optimizer state (the stacked weights' moments are their top row only)."""
  base = _base_run(tmp_path / "pretrain", tokenizer_dir, "decoder")
  config = shrink(classify_config.get_config("tiny"), base)
  config.train.update(dict(trainable="top_k_layers", trainable_top_k=1))
  workdir = str(tmp_path / "classify")
  train_and_evaluate(config, workdir, stop_after=2)
  final = train_and_evaluate(config, workdir)   # resumes at step 2
  records = read_metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
  assert final["eval_task/examples"] == 24.0
  assert 0 <= final["eval_task_init/accuracy"] <= 1 and "eval_task/macro_f1" in final
  # The loop's (sum, weight) accuracy over the whole split equals the gathered one.
  assert final["eval/accuracy"] == pytest.approx(final["eval_task/accuracy"], abs=1e-6)
  again = evaluate_run(workdir)
  assert "eval_task_init/accuracy" not in again
  for key in ("eval_task/accuracy", "eval_task/macro_f1", "eval_task/nll"):
    assert again[key] == pytest.approx(final[key], abs=1e-5), key

  before, after = _params(base, config, "decoder"), _params(workdir, config, "classifier")
  np.testing.assert_array_equal(after["embed"], before["embed"])
  q_before, q_after = before["blocks"]["layers"]["attn"]["q"], after["blocks"]["layers"][
      "attn"]["q"]
  np.testing.assert_array_equal(q_after[:2], q_before[:2])
  assert not np.array_equal(q_after[2], q_before[2])
  mu = build_setup(config, get_stage("classify")).abstract_state["opt_state"][1][0].mu
  assert set(mu) == {"blocks", "final_norm", "score"}
  assert mu["blocks"]["layers"]["attn"]["q"].shape == (1,) + q_after.shape[1:]

  # scripts.classify: one line per input, argmax of the probabilities, in input order.
  texts = [{"text": "Ada the weaver sold linen."}, {"text": "Bran sold 3 sacks of salt.",
                                                    "label": "salt"}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
  model = load_classifier(workdir)
  assert classify_file(model, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")) == 2
  lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [x["text"] for x in lines] == [t["text"] for t in texts]
  for line in lines:
    probs = line["probabilities"]
    assert set(probs) == set(classify_config.TINY_GOODS)
    assert line["label"] == max(probs, key=probs.get) and abs(sum(probs.values()) - 1) < 1e-4
  assert lines[1]["reference"] == "salt" and "reference" not in lines[0]


def test_unrolled_layers_freeze_per_layer(tmp_path):
  """Unrolled layers: the frozen layers' params get no gradient and no moments; one step
  through the run's real setup leaves them bit-identical."""
  config = shrink(classify_config.get_config("tiny"), "", scan=False)
  config.train.update(dict(trainable="top_k_layers", trainable_top_k=1))
  config.optimizer.warmup_steps = 0   # the first step moves what it trains
  setup = build_setup(config, get_stage("classify"))
  state = setup.fresh_state()
  before = jax.tree.map(np.asarray, state["params"])
  mu = state["opt_state"][1][0].mu
  assert set(mu) == {"blocks", "final_norm", "score"}
  assert [str(k) for k in mu["blocks"]["layers"]] == [str(LAYERS - 1)]
  batch = {k: np.zeros(v.shape, v.dtype)
           for k, v in get_stage("classify").abstract_batch(config).items()}
  batch.update(inputs=np.full(batch["inputs"].shape, 5, np.int32),
               segment_ids=np.ones(batch["inputs"].shape, np.int32))
  batch["loss_mask"][:, -1] = 1.0
  batch["positions"][:] = np.arange(batch["inputs"].shape[1])
  state, metrics = setup.train_step()(state, batch)
  after = jax.tree.map(np.asarray, state["params"])
  layers = sorted(after["blocks"]["layers"], key=str)
  for layer in layers[:-1]:
    jax.tree.map(np.testing.assert_array_equal, after["blocks"]["layers"][layer],
                 before["blocks"]["layers"][layer])
  np.testing.assert_array_equal(after["embed"], before["embed"])
  assert not np.array_equal(after["score"]["kernel"], before["score"]["kernel"])
  assert float(metrics["loss"][1]) == batch["inputs"].shape[0]


def test_encoder_regression_on_pair_files(tokenizer_dir, tmp_path):
  """STS-B-like pairs with float labels on an encoder classifier (one output), head only."""
  base = _base_run(tmp_path / "mlm", tokenizer_dir, "encoder")
  rows = [{"sentence1": f"Ada sold {i} sacks of salt.", "sentence2": f"Bran sold {i % 4} bars.",
           "label": float(i % 5)} for i in range(40)]
  files = str(tmp_path / "stsb.jsonl")
  (tmp_path / "stsb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = shrink(classify_config.get_config("tiny_encoder"), base, steps=2)
  config.model.num_labels = 1
  config.objective.problem_type = "regression"
  config.data.update(dict(source="files", train_files=files, eval_files=files,
                          text_field="sentence1", text_pair_field="sentence2", label_names=""))
  config.train.trainable = "head"
  config.eval.before = False
  final = train_and_evaluate(config, str(tmp_path / "stsb"))
  assert final["eval_task/examples"] == 40.0 and "eval_task_init/mse" not in final
  assert final["eval/mse"] == pytest.approx(final["eval_task/mse"], rel=1e-5)
  assert -1 <= final["eval_task/spearman"] <= 1 and -1 <= final["eval_task/pearson"] <= 1
  before, after = _params(base, config, "encoder"), _params(str(tmp_path / "stsb"), config,
                                                             "encoder_classifier")
  jax.tree.map(np.testing.assert_array_equal, after["blocks"], before["blocks"])
  tokenizer = Tokenizer.load(base + "/tokenizer/spm.model")
  batch = next(iter(get_stage("classify_encoder").make_dataset(
      config, tokenizer, split="train", batch_size=8, workdir=None)))
  abstract = get_stage("classify_encoder").abstract_batch(config)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (v.shape, v.dtype) for k, v in abstract.items()}


def test_trainable_settings_are_checked_by_key():
  config = base_config()
  spec = build_model_spec(config.model, "decoder")    # tied embeddings: no head outside
  config.train.trainable = "head"
  with pytest.raises(ValueError, match="no head params"):
    trainable_parts(config.train, spec)
  config.train.update(dict(trainable="top_k_layers", trainable_top_k=9))
  with pytest.raises(ValueError, match=r"trainable_top_k must be in \[1, 4\]"):
    trainable_parts(config.train, spec)
  config.train.trainable = "some"
  with pytest.raises(ValueError, match="config.train.trainable: unknown"):
    trainable_parts(config.train, spec)
  config = classify_config.get_config("tiny")
  config.train.trainable, config.lora.enabled = "head", True
  with pytest.raises(ValueError, match="LoRA"):
    build_setup(config, get_stage("classify"))


def test_pipeline_runs_both_classifiers_from_their_pretrained_bodies():
  plan = {name: overrides for name, _, _, overrides in stage_plan("runs/t", [
      "classify", "classify_encoder"])}
  assert plan == {"classify": {"init_from": "runs/t/pretrain"},
                  "classify_encoder": {"init_from": "runs/t/mlm"}}
