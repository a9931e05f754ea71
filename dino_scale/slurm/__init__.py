"""Slurm submission of the dino-scale stages: `python -m dino_scale.slurm submit ...`."""

from dino_scale.slurm.script import STAGES, Job, render
from dino_scale.slurm.submit import build_job, main, submit

__all__ = ["STAGES", "Job", "build_job", "main", "render", "submit"]
