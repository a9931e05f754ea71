"""dino-scale: distributed large-scale pretraining of DINO object detectors."""

from dino_scale.config import Config, ConfigError, load_config

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "load_config", "load_model", "__version__"]


def load_model(config_path, checkpoint_path, overrides=()):
    """Eval-mode DINO from a dino-scale or an official IDEA-Research DINO checkpoint.

    See `dino_scale.checkpoint_convert.load_model`.
    """
    from dino_scale.checkpoint_convert import load_model as _load_model

    return _load_model(config_path, checkpoint_path, overrides=overrides)
