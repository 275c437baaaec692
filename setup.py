"""Install: `pip install -e .` (runtime) or `pip install -e .[test]` (adds the test suite's needs)."""

from setuptools import find_packages, setup

setup(
    name="lmpipe",
    version="0.1.0",
    description="One JAX codebase for the whole LLM training pipeline: pretraining (CLM, MLM), "
    "continued pretraining, SFT, reward models, RLHF (PPO, GRPO), DPO and distillation.",
    python_requires=">=3.10",
    packages=find_packages(include=["configs*", "data*", "models*", "objectives*", "parallel*",
                                    "training*", "scripts*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "array-record>=0.8",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        # Hugging Face checkpoints and tokenizers (models/convert, data/tokenizer.py); numpy
        # only, no torch at run time.
        "safetensors>=0.4.3",
        "tokenizers>=0.19",
        "jinja2>=3.1",
        # Reports (training/plots.py: PNG figures, Agg backend), Parquet datasets
        # (data/records.py) and the scaling-law fit (training/chinchilla.py).
        "matplotlib>=3.8",
        "pyarrow>=14",
        "scipy>=1.11",
    ],
    extras_require={
        # torch pinned: its CPU wheel; an unpinned torch would pull the CUDA build. The
        # conversion parity tests build random models with transformers 5's config API.
        # jax[tpu] (libtpu) too: the TPU ahead-of-time compile tests run on CPU with it and
        # would otherwise be skipped.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5.0",
                 "jax[tpu]"],
        # jax's own extra pins the libtpu built for the installed jax; compile_check uses it
        # to compile for TPU topologies on any machine.
        "tpu": ["jax[tpu]"],
        # The CUDA plugin at the installed jax's version, without the CUDA libraries:
        # scripts/decode_check.py compiles for a GPU with it on any machine (and
        # tests/scripts/test_decode_check.py runs). Not in `test`: a plugin that JAX loads at
        # start-up logs a line on every run of a machine without a GPU.
        "gpu_aot": ["jax[cuda12-local]"],
    },
)
