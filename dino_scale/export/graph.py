"""The exported graph: an eval-mode DINO with post-processing, traced by torch.export and
written as ONNX by the dynamo-based `torch.onnx.export` (onnxscript translation).

Graph inputs:  images [B, 3, H, W] float32 (normalised, zero-padded), masks [B, H, W] bool
(True = padding), orig_sizes [B, 2] int64 (h, w) the boxes are scaled to.
Graph outputs: scores [B, K] float32, labels [B, K] int64, boxes [B, K, 4] float32 absolute
xyxy, K = min(num_select, Q * C), sorted by decreasing score (as `PostProcess`).

Multi-scale deformable attention is exported either from standard ops (`msda="gather"`:
`ms_deform_attn_gather`, one Gather per bilinear corner) or as one custom node per call
(`msda="custom"`: domain `dino_scale`, op `MSDeformAttn`, see docs/export.md) for a
runtime that brings its own kernel (a TensorRT plugin).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnxscript.values import Opset
from torch import nn

from dino_scale.errors import UserError
from dino_scale.io import atomic_write_bytes
from dino_scale.models.deformable_attention import MSDeformAttn
from dino_scale.models.postprocess import top_detections
from dino_scale.models.swin import SwinBackbone

# the torchlib translations start at opset 18; 23 is the newest torch.onnx emits
SUPPORTED_OPSETS = range(18, 24)
DEFAULT_OPSET = 18
MSDA_FORMS = ("gather", "custom")
CUSTOM_DOMAIN = "dino_scale"
CUSTOM_OP = "MSDeformAttn"
CUSTOM_ATTRIBUTES = ("n_heads", "head_dim", "n_levels", "n_points")


def _register_custom_schema() -> None:
    """The schema of the custom node (onnxscript builds nodes only for registered ops)."""
    if onnx.defs.has(CUSTOM_OP, CUSTOM_DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    onnx.defs.register_schema(onnx.defs.OpSchema(
        CUSTOM_OP, CUSTOM_DOMAIN, 1,
        doc="Multi-scale deformable attention (docs/export.md): output [N, Lq, M * D].",
        inputs=[param("value", "T"), param("spatial_shapes", "I"), param("level_start_index", "I"),
                param("sampling_locations", "T"), param("attention_weights", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32"), ("I", ["tensor(int64)"], "int64")],
        attributes=[onnx.defs.OpSchema.Attribute(name, onnx.defs.OpSchema.AttrType.INT, name)
                    for name in CUSTOM_ATTRIBUTES],
    ))


_register_custom_schema()
CUSTOM_OPSET = Opset(CUSTOM_DOMAIN, 1)
INPUT_NAMES = ["images", "masks", "orig_sizes"]
OUTPUT_NAMES = ["scores", "labels", "boxes"]


class ExportError(UserError):
    """A problem with the export's inputs (checkpoint, opset, output path): one line for the user."""


class DetectorWithPostprocess(nn.Module):
    """`(images, masks, orig_sizes) -> (scores [B, K], labels [B, K], boxes [B, K, 4])`."""

    def __init__(self, model: nn.Module, num_select: int) -> None:
        super().__init__()
        self.model = model
        self.num_select = num_select

    def forward(self, images: torch.Tensor, masks: torch.Tensor, orig_sizes: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(images, masks)
        return top_detections(out["pred_logits"], out["pred_boxes"], orig_sizes, self.num_select)


@dataclass
class ExportResult:
    path: Path
    opset: int
    msda: str
    dynamic_axes: dict[str, list[str | int]]  # per input: its dims, a name where dynamic
    custom_nodes: int


def _msda_custom_node(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Translation of torch.ops.dino_scale.ms_deform_attn_forward into one custom node."""
    _, _, heads, head_dim = value.shape
    _, _, _, levels, points, _ = sampling_locations.shape
    return CUSTOM_OPSET.MSDeformAttn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        n_heads=int(heads), head_dim=int(head_dim), n_levels=int(levels), n_points=int(points),
    )


def set_msda_impl(model: nn.Module, impl: str) -> None:
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.impl = impl


def symbolic_sizes_supported(model: nn.Module) -> bool:
    """Whether torch.export can trace `model` with symbolic height and width in reasonable time.
    Not with a Swin backbone: the per-block window padding and the patch merging nest floor
    divisions and modulos of the size, and simplifying them took sympy over 10 minutes before
    the first of its 24 stage-3 blocks was traced (a fixed size traces in ~12 s)."""
    return not isinstance(getattr(model, "backbone", None), SwinBackbone)


def example_inputs(batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random normalised images without padding, and their own sizes as the original sizes."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    sizes = torch.tensor([[height, width]] * batch, dtype=torch.int64)
    return images, masks, sizes


def check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"unsupported opset {opset}: this exporter writes opsets "
                          f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")


def export_onnx(model: nn.Module, out: str | Path, *, num_select: int, height: int, width: int,
                dynamic: bool, opset: int = DEFAULT_OPSET, msda: str = "gather",
                metadata: dict[str, str] | None = None, optimize: bool = True) -> ExportResult:
    """Export eval-mode `model` (a DINO) with post-processing to `out`, atomically.

    height/width: the example input's size, and the graph's only size unless `dynamic`: then
    height and width are symbolic too (refused for models where `symbolic_sizes_supported` is
    False: export those at the size they will serve, inputs padded up to it). The batch is
    always symbolic. The model's
    MSDA implementation is switched for the export and restored afterwards. `optimize`: run
    onnxscript's graph optimizer (constant folding, dead code); ONNX Runtime optimizes the
    graph again when it loads it, so skipping it only saves export time.
    """
    check_opset(opset)
    if dynamic and not symbolic_sizes_supported(model):
        raise ExportError(f"a {type(model.backbone).__name__} backbone exports at a fixed image size only "
                          "(symbolic sizes do not trace in reasonable time): give --height and --width, "
                          "e.g. the largest padded size it will serve; the batch stays dynamic")
    if msda not in MSDA_FORMS:
        raise ExportError(f"unknown MSDA form {msda!r}; choose one of {', '.join(MSDA_FORMS)}")
    out = Path(out)
    _check_writable(out)
    previous = {m: m.impl for m in model.modules() if isinstance(m, MSDeformAttn)}
    try:
        set_msda_impl(model, "gather" if msda == "gather" else "native")
        wrapper = DetectorWithPostprocess(model.eval(), num_select).eval()
        # batch 2: an example batch of 1 would be specialised to 1
        inputs = example_inputs(2, height, width)
        auto = torch.export.Dim.AUTO
        dynamic_shapes = {"images": {0: auto}, "masks": {0: auto}, "orig_sizes": {0: auto}}
        if dynamic:
            dynamic_shapes = {"images": {0: auto, 2: auto, 3: auto}, "masks": {0: auto, 1: auto, 2: auto},
                              "orig_sizes": {0: auto}}
        table = None
        if msda == "custom":
            if not hasattr(torch.ops, "dino_scale") or not hasattr(torch.ops.dino_scale, "ms_deform_attn_forward"):
                raise ExportError("msda=custom exports the native op's call sites, but the native op is not built")
            table = {torch.ops.dino_scale.ms_deform_attn_forward.default: _msda_custom_node}
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, inputs, dynamo=True, opset_version=opset, input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES, dynamic_shapes=dynamic_shapes, custom_translation_table=table,
                verbose=False, optimize=optimize,
            )
        proto = program.model_proto
        for key, value in (metadata or {}).items():
            proto.metadata_props.add(key=key, value=value)
        proto.metadata_props.add(key="dino_scale.msda", value=msda)
        onnx.checker.check_model(proto)
        atomic_write_bytes(out, proto.SerializeToString())
    finally:
        for module, impl in previous.items():
            module.impl = impl
    return describe(out)


def describe(path: str | Path) -> ExportResult:
    """Opset, MSDA form, input dims (names where dynamic) and custom-node count of a file."""
    proto = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    axes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    custom = sum(1 for n in proto.graph.node if n.domain == CUSTOM_DOMAIN and n.op_type == CUSTOM_OP)
    return ExportResult(Path(path), opset, meta.get("dino_scale.msda", "gather"), axes, custom)


def _check_writable(out: Path) -> None:
    """Fails early (before the minutes of tracing) when `out` cannot be written: a temp file
    beside it is created and removed; the graph is written later, atomically, the same way."""
    if out.is_dir():
        raise ExportError(f"cannot write {out}: it is a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(tmp)
