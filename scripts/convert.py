"""Convert checkpoints between Hugging Face folders and this codebase's run directories.

  # HF folder (config.json + safetensors, sharded or not) -> run dir any stage starts from
  python -m scripts.convert --from-hf /models/Llama-3.1-8B --to runs/llama3_8b
  python -m scripts.train --config configs/sft.py:... --config.init_from=runs/llama3_8b \\
      <the --config.model.* overrides printed by the conversion>

  # ... written already sharded for the training mesh (FSDP over 8 devices here)
  python -m scripts.convert --from-hf /models/Llama-3.1-8B --to runs/llama3_8b --mesh_fsdp=-1

  # run dir (converted or trained; LoRA runs are merged) -> HF folder `transformers` loads
  python -m scripts.convert --from runs/sft_llama --to-hf exports/sft_llama --dtype=bfloat16

  # BERT (BertForMaskedLM) <-> the MLM encoder (configs/mlm.py), both ways
  python -m scripts.convert --from-hf /models/bert-base-uncased --to runs/bert_base
  python -m scripts.train --config configs/mlm.py:base --config.init_from=runs/bert_base \\
      <the --config.model.* overrides printed by the conversion>
  python -m scripts.convert --from runs/mlm_base --to-hf exports/mlm_base

  # sequence classifiers (configs/classify.py) both ways: *ForSequenceClassification with
  # 2+ labels imports as it is; an LM's body gets a fresh head of --num_labels outputs; a
  # classify run exports as *ForSequenceClassification with its label names
  python -m scripts.convert --from-hf /models/bert-base-uncased --to runs/bert_mnli \\
      --kind encoder_classifier --num_labels 3
  python -m scripts.convert --from runs/mnli --to-hf exports/mnli

  # what a checkpoint holds (tensors, shapes, dtypes, parameters, family) and what each
  # tensor would become; reads headers only
  python -m scripts.convert --inspect /models/Qwen2.5-0.5B

Families: llama, mistral, qwen2, qwen3, mixtral, qwen3_moe, gpt2, and their one-label *ForSequenceClassification (reward
/ value heads); bert (masked LM, our "encoder"). Base models (LlamaModel, BertModel, ...) import
too: a head they lack starts fresh (logged). Conversion streams one tensor at a time; see
models/convert/ and training/hf_runs.py. A checkpoint that does not convert is one
`error: ...` line naming the file and tensor.
"""

import sys

from absl import app, flags, logging

from configs.base import base_config
from models.convert.errors import ConversionError
from models.convert.inspection import describe_checkpoint
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from training.hf_runs import export_hf, import_hf
from training.metrics import flatten_dict

# Compute choices a stage keeps its own values of; every other field defines the checkpoint.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "attention_block",
                   "attention_kernel_block", "init_std")


def define_flags():
  """Defined on use, not import: other entry points (scripts/benchmark.py's `dtype`) define
  flags of the same names, and tests import several of them into one process."""
  if "from-hf" in flags.FLAGS:  # already defined by an earlier call in this process
    return
  flags.DEFINE_string("from-hf", None, "Hugging Face model folder to import.")
  flags.DEFINE_string("to", None, "Run directory to write (with --from-hf).")
  flags.DEFINE_string("from", None, "Run directory (or checkpoint) to export.")
  flags.DEFINE_string("to-hf", None, "Hugging Face folder to write (with --from).")
  flags.DEFINE_string("inspect", None, "Print what this Hugging Face folder holds and what "
                      "each tensor would convert to; writes nothing.")
  flags.DEFINE_string("kind", None, "Our model kind (decoder | reward | encoder | classifier | "
                      "encoder_classifier); default: "
                      "inferred from the HF architecture or the run's stage.")
  flags.DEFINE_integer("num_labels", 0, "Import as a classifier kind with this many labels "
                       "(0: the HF config's; a head the checkpoint lacks starts fresh).")
  flags.DEFINE_string("param_dtype", "float32", "Stored dtype of imported params.")
  flags.DEFINE_bool("scan_layers", True, "Import with stacked (scanned) block params.")
  flags.DEFINE_string("dtype", None, "Exported tensor dtype (default: param_dtype).")
  flags.DEFINE_string("family", None, "Exported HF family (llama | mistral | qwen2 | qwen3 | "
                      "mixtral | qwen3_moe | gemma2 | gemma3_text | gpt2 | bert); default "
                      "inferred from the model config and kind.")
  flags.DEFINE_integer("max_shard_mb", 5000, "Exported safetensors shard size (MB).")
  flags.DEFINE_integer("mesh_data", 0, "Import sharded: data axis size (-1 fills).")
  flags.DEFINE_integer("mesh_fsdp", 0, "Import sharded: fsdp axis size (-1 fills).")
  flags.DEFINE_integer("mesh_tensor", 0, "Import sharded: tensor axis size.")
  flags.DEFINE_string("rules", "fsdp_tp", "Logical-axis rules of the target mesh.")


def model_overrides(model_cfg) -> list[str]:
  """`--config.model.X=V` flags that turn any stage preset's model into `model_cfg`'s
  architecture (all of its fields: presets differ from each other in any of them)."""
  return [f"--config.model.{k}={v}" for k, v in sorted(flatten_dict(model_cfg.to_dict()).items())
          if k not in _RUNTIME_FIELDS]


def _mesh(f):
  sizes = dict(data=f.mesh_data, fsdp=f.mesh_fsdp, tensor=f.mesh_tensor)
  if not any(sizes.values()):
    return None, None
  mesh_config = base_config().mesh
  mesh_config.update({k: (v or 1) for k, v in sizes.items()})
  return make_mesh(mesh_config), get_rules(f.rules)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  f = flags.FLAGS
  try:
    _convert(f)
  except ConversionError as e:
    sys.exit(f"error: {e}")


def _convert(f):
  if f.inspect:
    print(describe_checkpoint(f.inspect, f.kind), end="")
    return
  from_hf, to, from_run, to_hf = f["from-hf"].value, f.to, f["from"].value, f["to-hf"].value
  importing = bool(from_hf and to)
  exporting = bool(from_run and to_hf)
  if importing == exporting:
    raise app.UsageError("give either --from-hf DIR --to CKPT_DIR or --from CKPT_DIR --to-hf DIR")
  if importing:
    mesh, rules = _mesh(f)
    model_cfg = import_hf(from_hf, to, kind=f.kind, param_dtype=f.param_dtype,
                                  scan_layers=f.scan_layers, mesh=mesh, rules=rules,
                                  num_labels=f.num_labels or None)
    print(f"wrote {to}; start a stage from it with\n  --config.init_from={to} "
          + " ".join(model_overrides(model_cfg)))
  else:
    hf_config = export_hf(from_run, to_hf, family=f.family, kind=f.kind, dtype=f.dtype,
                                  max_shard_bytes=f.max_shard_mb * 1_000_000)
    print(f"wrote {to_hf} ({hf_config['architectures'][0]})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
