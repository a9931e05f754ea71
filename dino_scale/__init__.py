"""dino-scale: distributed large-scale pretraining of DINO object detectors."""

from dino_scale.config import Config, ConfigError, load_config

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "__version__", "load_config"]
