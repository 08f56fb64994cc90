"""Launch pretraining on Slurm: the sbatch template (pretrain.sbatch), the submitit launcher
(`python -m slurm.submit`), the preemption and requeue glue (task.py, job.py; each rank runs through
pretrain/rank.py), and
a local test cluster (cluster.py). See slurm/README.md. Imports `pretrain` for config only."""
