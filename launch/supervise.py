"""Run a `deepspeed` training and exit with a status that says how its ranks ended
(0 done, 75 stopped with latest/ saved: resume me, else failed; cats_ds/runtime/supervise.py):

    python launch/supervise.py deepspeed --num_gpus 2 launch/train.py \
        --deepspeed_config ds_configs/cpu_zero2.json --config launch/recipes/gettext8.yaml

SIGTERM / SIGINT / SIGUSR1 to it stop the ranks after the current update with latest/
saved (exit 75). launch/quickstart.sh and launch/slurm/train.sbatch run training through it.
"""

from cats_ds.runtime.supervise import main

if __name__ == "__main__":
    main()
