"""k2mcore: a megatron-core 3D-parallel trainer for Kimi-K2-class MoE models."""
from setuptools import find_packages, setup

setup(
    name="k2mcore",
    version="0.1.0",
    description="Megatron-core 3D-parallel trainer for Kimi-K2-class MoE models, CPU-provable",
    python_requires=">=3.12",
    packages=find_packages(include=["k2mcore", "k2mcore.*"]),
    package_data={
        "k2mcore": [
            "config/presets/*.yaml",
            "data/assets/*.md",
            "data/assets/*.txt",
            "data/assets/sample/*",
            "data/assets/tokenizer/*",
            "data/assets/tokenizer/*/*",  # Hugging Face tokenizer directories (k2-tiny/)
        ]
    },
    install_requires=[
        # constraints.txt pins the tested versions; the ranges admit a GPU container's torch
        # (2.11 and up) and megatron-core releases whose patch targets k2mcore.compat checks
        "torch>=2.11",
        "megatron-core>=0.19",
        "numpy",
        "pyyaml",
        "safetensors",
        "psutil",  # megatron dist-checkpointing's writers need it and do not declare it
        "einops",
        "tokenizers>=0.20",  # HF tokenizer.json
        "tiktoken>=0.7",  # Kimi-K2's tokenizer format
        "tqdm",
        "tensorboard",
        "matplotlib",  # tools/plot_run.py
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=2.0"],  # the default loader when it imports
        "gpu": ["transformer-engine[pytorch]"],
        # chat data (k2m-preprocess --chat, encode_chat): transformers' chat-template renderer
        "chat": ["transformers>=4.57", "jinja2>=3.1.6"],
        # k2m-rl: the rollout engine is transformers' DeepseekV3; prompts use its chat template
        "rl": ["transformers>=4.57", "jinja2>=3.1.6"],
        "test": ["pytest", "transformers>=4.57", "jinja2>=3.1.6"],
        # megatron-core's own Muon (benchmarks/bench_megatron_muon.py runs it beside MuonClip)
        "megatron-muon": ["emerging-optimizers>=0.3.0"],
    },
    entry_points={
        "console_scripts": [
            "k2m-train=k2mcore.cli.train:main",
            "k2m-preprocess=k2mcore.cli.preprocess:main",
            "k2m-plot=k2mcore.cli.plot:main",
            "k2m-convert=k2mcore.cli.convert:main",
            "k2m-plan=k2mcore.cli.plan:main",
            "k2m-rl=k2mcore.cli.rl:main",
        ],
    },
)
