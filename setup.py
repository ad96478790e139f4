"""Install the engine. Runtime deps are kept to the few libraries the engine really needs."""
from setuptools import find_packages, setup

setup(
    name="engine",
    version="0.1.0",
    description="A minimal, fast LLM fine-tuning engine that reads and writes Hugging Face checkpoints.",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "cli", "cli.*"]),
    install_requires=[
        # torch is pinned in the README/CI install line to the CPU wheel; any 2.x >= 2.4 works.
        "torch>=2.4",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "numpy>=1.24",
        "huggingface-hub>=0.23",
        "jinja2>=3.1",
        "tqdm>=4.66",
    ],
    extras_require={
        # transformers is the reference oracle for tests and benches only; engine/ never imports it.
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-cov>=5", "transformers>=4.45"],
        "plot": ["matplotlib>=3.7"],
    },
)
