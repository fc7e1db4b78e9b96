"""deranj: decoding-time realignment of language models, in JAX/Flax."""
import setuptools

# A set of versions seen to install together on Python 3.11 (CPU).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "absl-py==2.5.1",
    "clu==0.0.12",
    "tensorboard",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "sentencepiece",
    # Its wheel carries the embedded corpora (gensim/test/test_data); pinned so the
    # splits and the shipped tokenizer/checkpoint match the files they were built from.
    "gensim==4.4.0",
    "rouge-score",
    "matplotlib",
    "safetensors",
    "numpy",
]

# Hugging Face decoder-only pairs in `python -m deranj.sample` (tokenizer.json, chat
# templates); the models themselves load with safetensors alone.
HF_REQUIRES = ["tokenizers", "jinja2"]

# scripts/bench_sampler_decoder.py's trl arm: GeometricMixtureWrapper (Nash-MD) was
# removed from TRL after 1.13.
BENCH_REQUIRES = ["trl==1.13.0"]

TEST_REQUIRES = [
    *HF_REQUIRES,
    "pytest",
    "hypothesis",
    # Any other torch pulls a multi-GB CUDA build; 2.13.0 has a CPU wheel here.
    "torch==2.13.0",
    "transformers>=5,<6",
]

setuptools.setup(
    name="deranj",
    version="0.1.0",
    description="Decoding-time realignment (DeRa) of language models in JAX/Flax",
    packages=setuptools.find_packages(include=["deranj", "deranj.*"]),
    package_data={"deranj": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"hf": HF_REQUIRES, "test": TEST_REQUIRES, "bench": BENCH_REQUIRES},
)
