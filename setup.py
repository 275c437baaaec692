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
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        "tpu": ["libtpu"],
    },
)
