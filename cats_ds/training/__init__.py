"""Training: the loop around the DeepSpeed engine (loop.py), per-language losses and
gradients (losses.py, grads.py), saving and resuming checkpoints (checkpoint.py) and dev
translation at validations (validation.py). The top layer: nothing outside training/
imports loop.py, checkpoint.py or validation.py except cli.py and bench/."""
