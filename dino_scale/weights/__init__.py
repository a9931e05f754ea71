"""Every weight format and conversion, above the models and the data they fit:

- `official`: IDEA-Research DINO `.pth` files (read without running pickled code) <-> our
  state dicts (the model families remap the names);
- `safetensors`: our weight files (shared tensors once, metadata);
- `zero`: a DeepSpeed ZeRO training checkpoint consolidated into one of our files;
- `transfer`: pretrained weights into a model with another label set (class rows by name);
- `load`: either file format into a model, `load_model(config, checkpoint)`.
"""

from dino_scale.weights.errors import CheckpointError
from dino_scale.weights.load import load_model, load_state_into, read_weight_shapes, read_weights
from dino_scale.weights.official import is_official, official_to_ours, ours_to_official, read_official
from dino_scale.weights.safetensors import load_weights, read_metadata, save_weights
from dino_scale.weights.transfer import load_pretrained
from dino_scale.weights.zero import export_checkpoint

__all__ = [
    "CheckpointError", "export_checkpoint", "is_official", "load_model", "load_pretrained", "load_state_into",
    "load_weights", "official_to_ours", "ours_to_official", "read_metadata", "read_official", "read_weight_shapes",
    "read_weights",
    "save_weights",
]
