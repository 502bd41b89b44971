"""Average the model weights of several checkpoints of one run (fairseq's
average_checkpoints; family-expert parameters included) into a checkpoint folder that
launch/evaluate.py, launch/export.py and launch/analyze.py load.

    # train with numbered checkpoints: every 1000 updates, keep the newest 5
    deepspeed launch/train.py --deepspeed_config ds_configs/cpu_zero2.json \
        --config launch/recipes/gettext8.yaml train.save_every=1000 train.keep_last=5
    python launch/average.py --last 5 --save-dir runs/gettext8 --out runs/gettext8/avg5
    python launch/average.py --inputs runs/gettext8/step_4000 runs/gettext8/step_5000 --out runs/gettext8/avg2
    python launch/evaluate.py --checkpoint runs/gettext8/avg5 --split test

One CPU process. The output has no optimizer state (inference only). Same as `cats-average`.
"""

from cats_ds.cli import average_main

if __name__ == "__main__":
    average_main()
