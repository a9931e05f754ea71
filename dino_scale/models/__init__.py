"""DINO: the detector (`build_dino`), its criterion (`build_criterion`) and `PostProcess`."""

from dino_scale.models.criterion import SetCriterion, build_criterion
from dino_scale.models.dino import DINO, build_dino
from dino_scale.models.postprocess import PostProcess

__all__ = ["DINO", "PostProcess", "SetCriterion", "build_criterion", "build_dino"]
