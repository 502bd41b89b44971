from setuptools import find_packages, setup

setup(
    name="cats_ds",
    version="0.1.0",
    description="DeepSpeed training stack for massively multilingual translation with "
                "Curvature-Aware Task Scaling (Li & Gong)",
    packages=find_packages(include=["cats_ds", "cats_ds.*"]),
    package_data={"cats_ds.model": ["families/*.yaml"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1,<2.14",
        # the version the test suite ran on: grads.py reads DeepSpeed's gradient partitions
        # (ZeRO-1/2 _hp_mapping, BF16_Optimizer buffers, ZeRO-3 local grads), internals that
        # move between releases; widen only after the suite passes on the new one
        "deepspeed==0.19.8",
        "sentencepiece>=0.1.99",
        "sacrebleu>=2.3,<2.7",  # compare.py's bootstrap reads sentence statistics through sacreBLEU's
                                # private _extract_corpus_statistics / _compute_score_from_stats (2.3-2.6)
        "tensorboard>=2.10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.22",
        "psutil>=5.8",  # ranks watch their launcher (cats_ds/runtime/watchdog.py); DeepSpeed needs it too
        "safetensors>=0.4",  # model folders (cats_ds/inference/model_folder.py)
    ],
    extras_require={
        "plot": ["matplotlib>=3.5"],
        "export": ["ctranslate2>=4.0"],  # launch/export.py --format ctranslate2
        # launch/export.py --format transformers (tested with 5.25; its tokenizers and protobuf for spm's proto)
        "hf": ["transformers>=5.25,<6", "protobuf>=3.20"],
        "dev": ["pytest>=7", "matplotlib>=3.5", "ctranslate2>=4.0", "transformers>=5.25,<6", "protobuf>=3.20"],
    },
    entry_points={
        "console_scripts": [
            "cats-prepare=cats_ds.cli:prepare_main",
            "cats-train=cats_ds.cli:train_script",
            "cats-evaluate=cats_ds.cli:evaluate_script",
            "cats-analyze=cats_ds.cli:analyze_script",
            "cats-export=cats_ds.cli:export_main",
            "cats-average=cats_ds.cli:average_main",
            "cats-curve=cats_ds.cli:curve_main",
            "cats-figure3=cats_ds.cli:figure3_main",
            "cats-compare=cats_ds.cli:compare_main",
            "cats-slurm-hostfile=cats_ds.cli:slurm_hostfile_main",
        ]
    },
)
