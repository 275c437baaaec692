"""Hugging Face checkpoints in and out (Llama, Qwen2, Mistral, GPT-2; reward heads; BERT MLM).

  import_hf(hf_dir, out_dir)   HF folder -> run directory (config.json + orbax params) that
                               any stage starts from with --config.init_from=out_dir
  export_hf(run_dir, hf_dir)   run directory -> config.json + safetensors for `transformers`

Modules: families.py (config and tensor-name tables per family), heads.py (scalar heads),
layout.py (our param paths and layouts), safetensors_io.py (streaming shards, numpy only),
hf_import.py, hf_export.py. The command line is scripts/convert.py.
"""

from models.convert.hf_export import export_hf
from models.convert.hf_import import import_hf, model_config_from_hf

__all__ = ["export_hf", "import_hf", "model_config_from_hf"]
