"""Sections every stage config shares; each stage's `get_config` starts from `base_config()`.

Sections mirror packages: model, data, objective, optimizer, mesh, checkpoint, train.
All durations are in optimizer steps.
"""

import ml_collections

from configs.models import model_config
from configs.run_layout import tokenizer_path


def tokenizer_of_run(path_ref: ml_collections.FieldReference) -> ml_collections.FieldReference:
  """A lazy `data.tokenizer` value: the tokenizer of the run at `path_ref` ('' while empty).

  Stages that start from an earlier run (`config.init_from`, a distillation teacher) must use
  its tokenizer; with `config.data.tokenizer = tokenizer_of_run(config.get_ref('init_from'))`
  an override of the path moves the tokenizer along, and an explicit
  `--config.data.tokenizer=...` replaces it.
  """
  # FieldReference has no public lazy map; `_apply_op` is what its own `+` / `to_str` use.
  return path_ref._apply_op(tokenizer_path)  # pylint: disable=protected-access


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = ""
  config.seed = 0
  # Path of an earlier stage's workdir or checkpoint to take params from ('' = random init).
  config.init_from = ""
  config.model = model_config("tiny")

  config.data = ml_collections.ConfigDict(dict(
      # 'tiny_world': embedded generated corpus; 'files': local .jsonl/.txt globs; 'tfds': a
      # prepared tfds dataset read by random access (array_record).
      source="tiny_world",
      train_files="",          # comma-separated globs (source='files')
      eval_files="",
      text_field="text",       # JSONL field holding raw text
      txt_blocks=False,        # .txt: one document per blank-line-separated block, not per line
      tfds_name="",            # source='tfds': name (and optional version) of a prepared dataset
      tfds_data_dir="",
      train_split="train",
      eval_split="validation",
      tokenizer="",            # path of a sentencepiece .model; '' trains one into the workdir
      tokenizer_vocab_size=512,
      # source='tiny_world': 'world' (pretraining prose) or 'chronicle' (ledgers, weather and
      # caravan logs of the same towns, for continued pretraining), and how many documents.
      tiny_world_domain="world",
      tiny_world_train_docs=20_000,
      tiny_world_eval_docs=1_000,
      # How a reply is checked against a prompt's short reference answer, wherever answers are
      # scored (SFT held-out accuracy, RL rewards and evaluation): 'tiny_world' (states it as a
      # whole word) | 'exact' (is it) | 'package.module:function' (data/verifiers.py).
      answer_checker="tiny_world",
      seq_len=128,
      global_batch_size=16,
      shuffle=True,
      add_bos=True,
      add_eos=True,
      pack_bins=32,            # rows filled at once, first-fit, when packing documents
      skip_invalid=False,      # skip (and count) malformed records instead of failing
      worker_count=0,          # grain worker processes (0: in the main process)
      # Data shards the global batch is cut into, block k of rows always read from shard k
      # (parallel/host_data.py). 0: one shard per host's block of rows; a fixed count makes
      # the batches the same on any number of hosts and any mesh.
      num_shards=0,
      # A second corpus (continued pretraining: the original one), see data/mixture.py. When
      # replay_source is set its held-out loss is reported as eval_replay/* (forgetting), and
      # replay_weight > 0 mixes that share of its documents into training. Unset fields are
      # shared with the main corpus.
      replay_source="",        # '' (none) | 'tiny_world' | 'files' | 'tfds'
      replay_weight=0.0,       # share of training documents drawn from the replay corpus
      replay_tiny_world_domain="world",
      replay_train_files="",
      replay_eval_files="",
      replay_tfds_name="",
  ))

  config.objective = ml_collections.ConfigDict(dict(name="clm", z_loss=0.0))

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-4,
      warmup_steps=100,
      schedule="cosine",       # 'cosine' | 'linear' | 'constant' (after warmup)
      end_lr_ratio=0.1,        # final lr as a fraction of the peak
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,        # decoupled; never applied to norms, biases
      grad_clip=1.0,           # global-norm clipping (0: off)
  ))

  config.mesh = ml_collections.ConfigDict(dict(
      # Axis sizes inside a slice (ICI); -1 fills with the remaining devices.
      data=-1,
      fsdp=1,
      tensor=1,
      # Axis sizes across slices (DCN); their product is the number of slices.
      dcn_data=1,
      dcn_fsdp=1,
      dcn_tensor=1,
      rules="fsdp_tp",         # logical-axis rule preset, see parallel/rules.py
  ))

  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=500,
      max_to_keep=3,
      async_save=True,
      # A latest step that cannot be restored (truncated or missing files) is skipped for the
      # newest one that restores, logged, and moved aside to `{step}.unrestorable-{time}`.
      # On by default: a requeued or preempted job restarts unattended, and crash-looping on
      # one bad step loses more than the `every_steps` it redoes. False raises instead.
      fallback=True,
      # A missing or unreadable data iterator state is an error (resuming would silently
      # change the data order); True resumes the train state with a fresh iterator.
      fresh_data_iterator=False,
  ))

  config.train = ml_collections.ConfigDict(dict(
      steps=1000,
      grad_accum_steps=1,      # micro-batches per optimizer step (same result as one big batch)
      eval_every=500,
      eval_steps=10,
      log_every=10,
      # A step whose loss or gradient norm is not finite: 'stop' ends the run with an error
      # naming the step, before any later checkpoint; 'skip' drops that step's update
      # (training/step.py), counts it (train/nonfinite) and goes on, stopping only after
      # `max_nonfinite_skips` such steps in a row.
      nonfinite="stop",
      max_nonfinite_skips=10,
      # Which params train (training/trainable.py); the rest keep the values `init_from` gave
      # them and get no optimizer state: 'all' | 'head' (params outside the transformer body:
      # a classifier's or reward model's head, an untied LM head) | 'top_k_layers' (the last
      # `trainable_top_k` blocks, the final norm and the head). LoRA is `config.lora`.
      trainable="all",
      trainable_top_k=2,
  ))

  # LoRA (models/lora.py): train only low-rank adapters of these projections; the base
  # (from init_from) stays frozen and doubles as the DPO / PPO reference.
  config.lora = ml_collections.ConfigDict(dict(
      enabled=False,
      rank=8,
      alpha=16.0,              # the update is scaled by alpha / rank
      dropout=0.0,             # adapter-input feature dropout, one mask per layer and step
      targets="q,k,v,o,gate,up,down",   # comma-separated: q, k, v, o, gate, up, down
  ))
  return config
