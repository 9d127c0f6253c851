from setuptools import find_packages, setup

# importlib_resources: tfds needs it (etils.epath) to prepare a builder of our own (data/tfds_builders.py).
NOTEBOOKS = ["nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"]
# jax[tpu]: libtpu, matched to jax: runs on TPU VMs, and compiles for TPU topologies on any Linux
# machine (python -m raptr_jax.aot; compile-only devices, no TPU needed).
TPU = ['jax[tpu]>=0.5.0,<0.13; platform_system == "Linux"']
HF = ["torch>=2.4", "transformers>=5.0,<6", "lm-eval[hf]>=0.4.8"]
DATA = ["seqio>=0.0.19", "tensorflow-datasets>=4.9.4", "tensorflow>=2.16", "importlib_resources>=6", "pyarrow>=14"]

setup(
    name="raptr_jax",
    version="0.1.0",
    description="Efficient Transformer pretraining in JAX: RaPTr, layer dropping, stacking, "
                "random-LTD, batch selection, Lion/Sophia, under one fair budget protocol.",
    packages=find_packages(include=["raptr_jax", "raptr_jax.*"]),
    package_data={"raptr_jax.data.builtin": ["*.jsonl.gz", "*.model"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.5.0,<0.13",
        "flax>=0.11.0,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "ml-collections>=1.0,<2",
        "absl-py>=2.0",
        "numpy>=1.26",
        "scipy>=1.10",  # Student t quantiles of the comparison tables (raptr_jax/stats.py); jax needs it too
        "sentencepiece>=0.2,<0.3",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # transformers checkpoints in and out (raptr_jax/hf/) and their tokenizers, without torch:
        "safetensors>=0.4.3",
        "tokenizers>=0.15",
        "protobuf>=3.20",  # reads a SentencePiece model's normalizer to write its tokenizer.json
    ],
    extras_require={
        # Real corpora (C4, Wikipedia + BookCorpus, MiniPile) through seqio / tensorflow-datasets.
        "data": DATA,
        # tensorboard: its event reader checks that restarts log each step once (tests only).
        # nbclient + ipykernel: the suite runs the notebooks (notebooks/execute.py).
        "notebooks": NOTEBOOKS,
        "tpu": TPU,
        # Cross-checks against the field's implementations (pytest -m hf): transformers' models and
        # lm-evaluation-harness's scorer. Install a CPU-only torch first (PyTorch's CPU wheel index, or
        # a local wheel): PyPI's default torch brings ~5 GB of CUDA libraries. Never needed by a run.
        "hf": HF,
        # libtpu: the suite compiles a tiny config for small TPU slices (tests/test_aot.py).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "tensorboard>=2.16", *DATA, *NOTEBOOKS, *TPU],
    },
)
