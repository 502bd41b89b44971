"""Train a multilingual Transformer under the DeepSpeed launcher.

CPU, 2 ranks (laptop / CI):
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu_zero2.json \
        --config launch/recipes/gettext8.yaml train.max_updates=200
One GPU node, 8 GPUs, bf16 + ZeRO-2:
    deepspeed --num_gpus 8 launch/train.py --deepspeed_config ds_configs/zero2_bf16.json \
        --config launch/recipes/opus100.yaml weighting.method=cats
Several nodes (SLURM): sbatch launch/slurm/train.sbatch (see the header of that file).

Any config key can be overridden as section.key=value; train.resume=auto (the default)
continues from <train.save_dir>/latest. Every key, its default and its doc (no launcher):
    python launch/train.py --print-config [--config launch/recipes/gettext8.yaml] [section.key=value ...]
The resolved config is printed at start and written to <train.save_dir>/config.yaml.
"""

from cats_ds.cli import train_script

if __name__ == "__main__":
    train_script()
