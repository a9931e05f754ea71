"""Data for training and evaluation: WebDataset shard streaming with a resumable
position, DETR/DINO transforms, padded batches, and the COCO folder dataset.

Trainer API:
- `build_train_loader(cfg: DataConfig, *, batch_size, rank, world_size, seed, epoch=0) -> TrainLoader`
- `build_eval_dataset(cfg) -> CocoDetection` (`.coco` is the pycocotools ground truth)
- `build_eval_loader(cfg, *, batch_size, rank, world_size) -> DataLoader` of `Batch`
"""

from dino_scale.data.coco import CocoDetection, build_eval_dataset, build_eval_loader, load_coco
from dino_scale.data.collate import Batch, collate
from dino_scale.data.loader import CocoTrainLoader, ResumableLoader, TrainLoader, build_train_loader
from dino_scale.data.shards import BadDataError
from dino_scale.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "BadDataError", "Batch", "CocoDetection", "CocoTrainLoader", "EvalTransform", "ResumableLoader", "TrainLoader",
    "TrainTransform",
    "build_eval_dataset", "build_eval_loader", "build_train_loader", "collate", "load_coco",
]
