"""Hugging Face checkpoints <-> our params (Llama, Qwen2, Mistral, GPT-2; reward heads; BERT MLM).

  hf_import.py        HF config.json -> our `config.model` (`model_config_from_hf`); HF tensors
                      -> our params, sharded or not (`convert_hf_params`)
  hf_export.py        our params, one at a time -> config.json + safetensors for `transformers`
                      (`write_hf`)
  families.py         config and tensor-name tables per family
  heads.py            scalar heads (reward / value, `*ForSequenceClassification`)
  layout.py           our param paths and layouts
  safetensors_io.py   streaming safetensors shards, numpy only

Run directories in and out (a checkpoint, config.json, the tokenizer) are training/hf_runs.py's
`import_hf` / `export_hf`; the command line is scripts/convert.py.
"""
