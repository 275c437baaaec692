"""Convert checkpoints between Hugging Face folders and this codebase's run directories.

  # HF folder (config.json + safetensors, sharded or not) -> run dir any stage starts from
  python -m scripts.convert --from-hf /models/Llama-3.1-8B --to runs/llama3_8b
  python -m scripts.train --config configs/sft.py:... --config.init_from=runs/llama3_8b \\
      <the --config.model.* overrides printed by the conversion>

  # ... written already sharded for the training mesh (FSDP over 8 devices here)
  python -m scripts.convert --from-hf /models/Llama-3.1-8B --to runs/llama3_8b --mesh_fsdp=-1

  # run dir (converted or trained; LoRA runs are merged) -> HF folder `transformers` loads
  python -m scripts.convert --from runs/sft_llama --to-hf exports/sft_llama --dtype=bfloat16

Families: llama, mistral, qwen2, gpt2, and their one-label *ForSequenceClassification (reward
/ value heads). Conversion streams one tensor at a time; see models/convert/.
"""

from absl import app, flags, logging

_FROM_HF = flags.DEFINE_string("from-hf", None, "Hugging Face model folder to import.")
_TO = flags.DEFINE_string("to", None, "Run directory to write (with --from-hf).")
_FROM = flags.DEFINE_string("from", None, "Run directory (or checkpoint) to export.")
_TO_HF = flags.DEFINE_string("to-hf", None, "Hugging Face folder to write (with --from).")
_KIND = flags.DEFINE_string("kind", None, "Our model kind (decoder | reward); default: "
                            "inferred from the HF architecture or the run's stage.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "Stored dtype of imported params.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Import with stacked (scanned) block params.")
_DTYPE = flags.DEFINE_string("dtype", None, "Exported tensor dtype (default: param_dtype).")
_FAMILY = flags.DEFINE_string("family", None, "Exported HF family (llama | mistral | qwen2 | "
                              "gpt2); default inferred from the model config.")
_SHARD = flags.DEFINE_integer("max_shard_mb", 5000, "Exported safetensors shard size (MB).")
_MESH_DATA = flags.DEFINE_integer("mesh_data", 0, "Import sharded: data axis size (-1 fills).")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", 0, "Import sharded: fsdp axis size (-1 fills).")
_MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 0, "Import sharded: tensor axis size.")
_RULES = flags.DEFINE_string("rules", "fsdp_tp", "Logical-axis rules of the target mesh.")


# Compute choices a stage keeps its own values of; every other field defines the checkpoint.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "attention_block", "init_std")


def model_overrides(model_cfg) -> list[str]:
  """`--config.model.X=V` flags that turn any stage preset's model into `model_cfg`'s
  architecture (all of its fields: presets differ from each other in any of them)."""
  from training.metrics import flatten_dict
  return [f"--config.model.{k}={v}" for k, v in sorted(flatten_dict(model_cfg.to_dict()).items())
          if k not in _RUNTIME_FIELDS]


def _mesh():
  sizes = dict(data=_MESH_DATA.value, fsdp=_MESH_FSDP.value, tensor=_MESH_TENSOR.value)
  if not any(sizes.values()):
    return None, None
  from configs.base import base_config
  from parallel.mesh import make_mesh
  from parallel.rules import get_rules
  mesh_config = base_config().mesh
  mesh_config.update({k: (v or 1) for k, v in sizes.items()})
  return make_mesh(mesh_config), get_rules(_RULES.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  importing = bool(_FROM_HF.value and _TO.value)
  exporting = bool(_FROM.value and _TO_HF.value)
  if importing == exporting:
    raise app.UsageError("give either --from-hf DIR --to CKPT_DIR or --from CKPT_DIR --to-hf DIR")
  from models import convert  # after flags: keeps --help fast
  if importing:
    mesh, rules = _mesh()
    model_cfg = convert.import_hf(_FROM_HF.value, _TO.value, kind=_KIND.value,
                                  param_dtype=_PARAM_DTYPE.value, scan_layers=_SCAN.value,
                                  mesh=mesh, rules=rules)
    print(f"wrote {_TO.value}; start a stage from it with\n  --config.init_from={_TO.value} "
          + " ".join(model_overrides(model_cfg)))
  else:
    hf_config = convert.export_hf(_FROM.value, _TO_HF.value, family=_FAMILY.value,
                                  kind=_KIND.value, dtype=_DTYPE.value,
                                  max_shard_bytes=_SHARD.value * 1_000_000)
    print(f"wrote {_TO_HF.value} ({hf_config['architectures'][0]})")


if __name__ == "__main__":
  app.run(main)
