"""nemo-bard: BARD block-diffusion VLMs (Qwen3-VL) as a NeMo AutoModel plugin."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="nemo-bard",
    version="0.1.0",
    description="BARD: turn an autoregressive Qwen3-VL into a block-diffusion VLM with NeMo AutoModel",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["nemo_bard", "nemo_bard.*"]),
    include_package_data=True,
    # the Hydra configs (conf/ in a clone is a link to nemo_bard/conf): the demo and `automodel finetune --config`
    # find them in an installed package too
    package_data={"nemo_bard": ["conf/*.yaml", "conf/*/*.yaml"]},
    install_requires=[
        "nemo_automodel[vlm]==0.7.0",  # pins transformers 5.18.0 and brings torch
        "hydra-core>=1.3.8,<1.4",
        "omegaconf>=2.3,<2.4",
        "pydantic>=2.5,<3",  # the bard/block_merge/kd config schema
        # the OpenAI-compatible server (python -m nemo_bard.serve)
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "prometheus-client>=0.20",
        "httpx>=0.27",  # the serving benchmark's load generator
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "import-linter>=2.1", "scikit-learn>=1.3", "matplotlib>=3.7", "av>=12", "openai>=1.40"],
        # Video files (mp4, webm, mkv, ...) in training rows, generation and evaluation: PyAV (bundles FFmpeg).
        "video": ["av>=12"],
        "demo": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        # Megatron-FSDP backend on GPU clusters. megatron-core >= 0.17 needs Python >= 3.12.
        "megatron": ["megatron-core>=0.17; python_version >= '3.12'"],
        # lmms-eval 0.7.3 needs filelock < 4; installing it may also downgrade antlr4 (used by Hydra).
        "lmms-eval": ["lmms-eval>=0.7.3,<0.8", "filelock<4"],
    },
    entry_points={
        "console_scripts": [
            # Ours replaces nemo_automodel's `automodel` script (it accepts both CLI forms);
            # `nemo-bard` always points at ours, even after nemo_automodel is reinstalled.
            "automodel = nemo_bard.cli:main",
            "nemo-bard = nemo_bard.cli:main",
        ],
        "lmms_eval.models": ["nemo_bard = nemo_bard.eval.lmms:lmms_eval_manifest"],
        # NeMo AutoModel builds the training class (checkpointing mixin, sharding plan); the import is lazy.
        "nemo_automodel.architectures": [
            "BardVLForConditionalGeneration = nemo_bard.integrations.nemo:NeMoBardVLForConditionalGeneration",
            "BardQwen3VLForConditionalGeneration = nemo_bard.integrations.nemo:NeMoBardVLForConditionalGeneration",
        ],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
)
