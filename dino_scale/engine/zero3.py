"""Making DINO's parameter accesses visible to ZeRO-3.

ZeRO-3 gathers a parameter only around its own module's forward (pre-hook) and backward
(hooks on the tensors the module returns). Two DINO patterns escape that:
- embedding tables read directly (`transformer.tgt_embed.weight`, `label_enc.weight`) in
  the parent's forward: each `nn.Embedding` weight is registered as an external parameter
  of its parent module;
- a submodule returning a dataclass (the transformer's output): ZeRO-3 cannot find the
  tensors inside, so their backward would run on released (empty) parameters. A forward
  hook turns such outputs into a NamedTuple with the same fields (attribute access
  unchanged), which ZeRO-3 traverses. Registered before DeepSpeed's own hooks, so it runs
  first.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from deepspeed.runtime.zero.partition_parameters import register_external_parameter
from torch import nn

_NAMEDTUPLE_OF: dict[type, type] = {}


def prepare_for_zero3(model: nn.Module) -> None:
    """Register the hooks and external parameters above on every module of `model`."""
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, nn.Embedding):
                register_external_parameter(parent, child.weight)
        parent.register_forward_hook(_dataclass_output_as_namedtuple)


def _dataclass_output_as_namedtuple(module: nn.Module, args: Any, output: Any) -> Any:
    if not dataclasses.is_dataclass(output) or isinstance(output, type):
        return None
    cls = type(output)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls not in _NAMEDTUPLE_OF:
        _NAMEDTUPLE_OF[cls] = collections.namedtuple(cls.__name__, names)
    return _NAMEDTUPLE_OF[cls](*(getattr(output, n) for n in names))
