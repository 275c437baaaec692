"""Task fine-tuning: a classification (or regression) head on a pretrained decoder or encoder.

On the tiny world, from the pipeline's pretrained decoder and MLM encoder (configs/pretrain.py,
configs/mlm.py): which of the world's 12 goods is a sentence about (data/classify.py)?

  python -m scripts.train --config configs/classify.py:tiny --workdir runs/classify_tiny \\
      --config.init_from=runs/pretrain_tiny
  python -m scripts.train --config configs/classify.py:tiny_encoder \\
      --workdir runs/classify_encoder_tiny --config.init_from=runs/mlm_tiny

The body's params come from `init_from` (its LM / MLM head is dropped, the new head starts
fresh: models/heads.py) and so does the tokenizer. metrics.jsonl reports, over the whole
held-out split, `eval_task/accuracy`, `eval_task/macro_f1` (or `eval_task/mse`, `/pearson`,
`/spearman` for regression), and once `eval_task_init/*`: the model the run starts from.
`python -m scripts.classify --workdir RUN --input x.jsonl --output y.jsonl` labels new texts.

Data (`config.data`): records {text_field[, text_pair_field], label_field}; labels are ints,
names from `label_names` (comma-separated, in label-id order) or, for regression, numbers.
Pairs: the encoder reads [CLS] a [SEP] b [SEP] with token types 0 / 1, the decoder a
`pair_separator` b. Sources: `tiny_world`, `files` (JSONL, .json arrays, Parquet) or `tfds`.
Model: `num_labels` (1 for regression), `classifier_pooler` (BERT's tanh pooler, encoder).
Objective: `problem_type` classification | regression, `label_smoothing`, `class_weights`
('' or one weight per label). `train.trainable` head | top_k_layers | all fine-tunes a part.

Presets: tiny, tiny_encoder; imdb_gpt2 (tfds imdb_reviews), sst2_bert, mnli_bert, stsb_bert
(GLUE files) on converted Hugging Face checkpoints of GPT-2 small / BERT-base, e.g.

  python -m scripts.convert --from-hf /models/bert-base-uncased --to runs/bert_mnli \\
      --kind encoder_classifier --num_labels 3
  python -m scripts.train --config configs/classify.py:mnli_bert --workdir runs/mnli \\
      --config.init_from=runs/bert_mnli --config.data.train_files='glue/mnli/train*.parquet' \\
      --config.data.eval_files='glue/mnli/validation_matched*.parquet'
"""

import ml_collections

from configs import base
from configs.models import base_model_config, model_config

# data/world.py's goods, the labels of the tiny task (data/classify.py TINY_LABEL_NAMES).
TINY_GOODS = ("salt", "copper", "wool", "barley", "honey", "timber", "cheese", "linen", "iron",
              "apples", "fish", "candles")
# Hugging Face's GPT-2 small (`gpt2`) and BERT-base (`bert-base-uncased`), as scripts.convert
# imports them.
GPT2_SMALL = dict(vocab_size=50257, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                  head_dim=64, mlp_dim=3072, norm="layernorm", norm_eps=1e-5,
                  position="learned", max_length=1024, activation="gelu",
                  gelu_approximate=True, qkv_bias=True, out_bias=True, mlp_bias=True,
                  tie_embeddings=True)
BERT_BASE = dict(vocab_size=30522, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                 head_dim=64, mlp_dim=3072, norm="layernorm", norm_eps=1e-12,
                 position="learned", max_length=512, activation="gelu",
                 gelu_approximate=False, qkv_bias=True, out_bias=True, mlp_bias=True,
                 tie_embeddings=True, norm_position="post", embed_norm=True,
                 type_vocab_size=2)
# GLUE preset -> (num_labels, label names, (text field, pair field), problem type)
_GLUE = {
    "sst2_bert": (2, "negative,positive", ("sentence", ""), "classification"),
    "mnli_bert": (3, "entailment,neutral,contradiction", ("premise", "hypothesis"),
                  "classification"),
    "stsb_bert": (1, "", ("sentence1", "sentence2"), "regression"),
}


def classifier_model(model: ml_collections.ConfigDict, num_labels: int,
                     pooler: bool = False) -> ml_collections.ConfigDict:
  """`model` with the classifier fields (models/heads.py): `num_labels` outputs and, on an
  encoder, BERT's pooler."""
  model.num_labels = num_labels
  model.classifier_pooler = pooler
  return model


def _preset_model(fields: dict) -> ml_collections.ConfigDict:
  model = base_model_config()
  model.update(fields)
  return model


def set_tiny(config: ml_collections.ConfigDict, encoder: bool) -> None:
  """The tiny world's goods task (CPU, under a minute)."""
  config.init_from = "runs/mlm_tiny" if encoder else "runs/pretrain_tiny"
  config.model = classifier_model(model_config("tiny"), len(TINY_GOODS), pooler=encoder)
  config.data.source = "tiny_world"
  config.data.label_names = ",".join(TINY_GOODS)
  config.data.tokenizer_vocab_size = config.model.vocab_size
  config.data.seq_len = 64             # ~4 sentences of ~14 tokens per row
  config.data.global_batch_size = 16
  config.data.tiny_task_train_records = 4000
  config.data.tiny_task_eval_records = 256  # distinct held-out sentences
  config.train.steps = 60
  config.train.eval_every = 30
  config.train.eval_steps = 8          # the whole held-out split (~4 sentences a row)
  config.train.log_every = 10
  config.checkpoint.every_steps = 60
  # The encoder's head is two fresh layers (pooler, classifier): a higher rate (it was
  # pretrained at 2e-3) reaches 0.93 held-out accuracy in these steps against 0.85 at 1e-3.
  config.optimizer.update(dict(lr=3e-3 if encoder else 1e-3, warmup_steps=6,
                               weight_decay=0.0))


def set_hf(config: ml_collections.ConfigDict, arg: str) -> None:
  """A converted Hugging Face checkpoint on a public task (README has the commands)."""
  if arg == "imdb_gpt2":
    # IMDb (Maas et al., 2011) from tfds: 25k reviews per split, labels 0 neg / 1 pos.
    config.model = classifier_model(_preset_model(GPT2_SMALL), 2)
    config.data.update(dict(source="tfds", tfds_name="imdb_reviews", train_split="train",
                            eval_split="test", label_names="negative,positive",
                            # GPT-2 pads with its EOS token, which HF's classifier skips.
                            add_bos=False, add_eos=False, seq_len=512,
                            global_batch_size=16))
    config.train.steps = 3000      # ~2 epochs (reviews average ~300 tokens: ~1.5 per row)
    config.optimizer.update(dict(lr=2e-5, warmup_steps=200))
  else:
    num_labels, names, (text, pair), problem = _GLUE[arg]
    config.model = classifier_model(_preset_model(BERT_BASE), num_labels, pooler=True)
    config.objective.problem_type = problem
    config.data.update(dict(source="files", text_field=text, text_pair_field=pair,
                            label_names=names, seq_len=128, global_batch_size=32,
                            packing=False,   # one example per row, as the BERT recipes
                            skip_invalid=True))  # GLUE's unlabelled test rows (label -1)
    # BERT's GLUE recipe (Devlin et al., 2019, sec. 4.1): batch 32, 3 epochs, lr 2e-5.
    config.train.steps = {"sst2_bert": 6300, "mnli_bert": 36800, "stsb_bert": 540}[arg]
    config.optimizer.update(dict(lr=2e-5, warmup_steps=config.train.steps // 10,
                                 schedule="linear", end_lr_ratio=0.0, b2=0.999,
                                 weight_decay=0.01))
  config.train.eval_every = 500
  config.train.eval_steps = 50
  config.checkpoint.every_steps = 500
  config.data.tokenizer_vocab_size = config.model.vocab_size


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = base.base_config()
  config.stage = "classify"
  config.objective = ml_collections.ConfigDict(dict(
      name="classify",            # 'classify' (decoder) | 'classify_encoder' (encoder)
      problem_type="classification",  # 'classification' | 'regression' (num_labels 1)
      label_smoothing=0.0,        # eps of the smoothed targets (objectives/classify.py)
      class_weights="",           # '' or one weight per label, comma-separated
  ))
  # The earlier run's tokenizer, following --config.init_from (configs/base.py).
  config.data.tokenizer = base.tokenizer_of_run(config.get_ref("init_from"))
  config.data.update(dict(
      text_pair_field="",         # second text of a pair ('' : single texts)
      label_field="label",
      label_names="",             # comma-separated names of label ids 0, 1, ...
      pair_separator="\n",        # decoder: text between the two texts of a pair
      packing=True,               # several examples per row (False: one per row)
      pack_bins=16,
      tiny_task_train_records=4000,
      tiny_task_eval_records=256,
  ))
  config.eval = ml_collections.ConfigDict(dict(
      before=True,                # also score the model the run starts from, once
      max_examples=0,             # held-out examples scored as a whole set (0: all)
  ))
  encoder = arg in ("tiny_encoder", *_GLUE)
  if encoder:
    config.objective.name = "classify_encoder"
  if arg in ("tiny", "tiny_encoder"):
    set_tiny(config, encoder)
  elif arg in ("imdb_gpt2", *_GLUE):
    set_hf(config, arg)
  else:
    raise ValueError(f"unknown preset {arg!r}: tiny, tiny_encoder, imdb_gpt2, "
                     f"{', '.join(_GLUE)}")
  return config
