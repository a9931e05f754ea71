"""Training engine: DeepSpeed trainer, checkpoints, export, COCO evaluation."""

from dino_scale.engine.trainer import Components, NonFiniteLossError, Trainer, TrainResult, train

__all__ = ["Components", "NonFiniteLossError", "Trainer", "TrainResult", "train"]
