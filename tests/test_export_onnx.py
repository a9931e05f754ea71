"""ONNX export (`python -m dino_scale.export onnx`): the graph ONNX Runtime runs gives the
eager model's detections on real coco-mini images at two sizes (R50 and Swin-L configs,
random weights from a checkpoint file), the custom-op form has one documented node per
deformable attention call, `launch/infer.py --onnx` draws from the file, and bad inputs
stop with one line, exit status 2 and no file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import infer
from dino_scale.config import load_config
from dino_scale.data.collate import collate
from dino_scale.data.transforms import build_eval_transform
from dino_scale.errors import UserError, run_command
from dino_scale.export.__main__ import main as export_main
from dino_scale.export.graph import CUSTOM_DOMAIN, CUSTOM_OP, ExportError, export_onnx
from dino_scale.export.runtime import OnnxDetector, pad_to
from dino_scale.models import PostProcess, build_dino
from dino_scale.models.dino import _resize_mask
from dino_scale.weights import load_model
from dino_scale.weights.safetensors import save_weights
from launch_helpers import SMALL_SWIN

REPO = Path(__file__).resolve().parents[1]
R50 = REPO / "configs" / "dino_r50_4scale_coco.yaml"
SWINL = REPO / "configs" / "finetune_coco_swinl.yaml"
DEMO = REPO / "configs" / "demo" / "finetune.yaml"
TOL = 1e-4
CATEGORIES = [{"id": i, "name": f"class{i}"} for i in range(1, 11)]


def _random_checkpoint(config: Path, path: Path, seed: int = 0) -> Path:
    cfg = load_config(config)
    cfg.model.backbone.pretrained_path = None
    torch.manual_seed(seed)
    model = build_dino(cfg.model)
    with torch.no_grad():
        # scores around 0.5 (the prior bias puts every random score at ~0.01, where sigmoid is
        # flat); the random weights still rank (query, class) pairs: several labels
        model.class_embed.bias.zero_()
        # The two-stage selection orders the proposals by encoder score and query i takes
        # content embedding i. Random weights score many proposals within float rounding of
        # each other, so two correct runs may order them differently and pair contents with
        # other boxes. With one content for every query, that order changes no detection.
        model.transformer.tgt_embed.weight.copy_(model.transformer.tgt_embed.weight[:1].expand_as(
            model.transformer.tgt_embed.weight))
    save_weights(model.state_dict(), path, {"categories": CATEGORIES})
    return path


def _export(config: Path, checkpoint: Path, out: Path, *extra: str) -> Path:
    assert export_main(["onnx", "--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out),
                        *extra]) == 0
    return out


def _batch(images: list[Path], eval_size: int, max_size: int):
    """Eval-transformed, padded batch of real images and their original sizes."""
    transform = build_eval_transform(type("Data", (), {"eval_size": eval_size, "eval_max_size": max_size})())
    samples = []
    for path in images:
        image = Image.open(path).convert("RGB")
        target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64),
                  "image_id": 0, "orig_size": [image.height, image.width]}
        samples.append(transform(image, target))
    batch = collate(samples)
    sizes = torch.stack([t["orig_size"] for t in batch.targets])
    return batch.images, batch.masks, sizes


def _assert_same_detections(onnx_out: dict[str, np.ndarray], eager: list[dict[str, torch.Tensor]],
                            sizes: torch.Tensor) -> None:
    """Scores within TOL in rank order; every eager detection has an ONNX one of the same
    label, a score within TOL and a box within TOL of the image size (ties may swap ranks)."""
    for i, det in enumerate(eager):
        scores, labels, boxes = det["scores"].numpy(), det["labels"].numpy(), det["boxes"].numpy()
        o_scores, o_labels, o_boxes = onnx_out["scores"][i], onnx_out["labels"][i], onnx_out["boxes"][i]
        assert o_scores.shape == scores.shape and o_boxes.shape == boxes.shape
        assert np.abs(o_scores - scores).max() <= TOL
        scale = float(sizes[i].max())
        unmatched = []
        for k in range(len(scores)):
            near = (np.abs(o_scores - scores[k]) <= TOL) & (o_labels == labels[k])
            box_err = np.abs(o_boxes[near] - boxes[k]).max(-1) / scale if near.any() else np.array([np.inf])
            if box_err.min() > TOL:
                unmatched.append(k)
        assert not unmatched, f"image {i}: eager detections {unmatched[:5]} have no ONNX match"
        # the detections are not trivial: distinct scores, several classes, boxes of many queries
        assert scores[0] - scores[-1] > 1e-2 and len(np.unique(labels)) > 1
        assert len(np.unique(boxes.round(2), axis=0)) > len(boxes) // 4


def _check_equal_to_eager(onnx_path: Path, config: Path, checkpoint: Path, batches) -> None:
    cfg = load_config(config)
    model = load_model(config, checkpoint)
    detector = OnnxDetector(onnx_path)
    postprocess = PostProcess(cfg.model.num_select)
    for images, masks, sizes in batches:
        with torch.no_grad():
            eager = postprocess(model(images, masks), sizes)
        _assert_same_detections(detector(images, masks, sizes), eager, sizes)


def test_mask_downsampling_equals_nearest_interpolation():
    # the model picks the padding mask's rows/columns by index (an exported graph keeps
    # them); they must be the ones F.interpolate(mode="nearest") picked before
    generator = torch.Generator().manual_seed(0)
    for height in range(64, 420, 29):
        for width in range(64, 480, 37):
            mask = torch.rand(2, height, width, generator=generator) > 0.5
            for stride in (4, 8, 16, 32, 64):
                size = torch.Size((-(-height // stride), -(-width // stride)))
                expected = F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]
                assert torch.equal(_resize_mask(mask, size), expected), (height, width, stride)


@pytest.fixture(scope="module")
def images(coco_mini) -> list[Path]:
    return sorted((coco_mini / "train2017").glob("*.jpg"))[:3]


@pytest.mark.export_full
def test_r50_onnx_runtime_equals_eager_at_two_sizes(tmp_path_factory, images):
    tmp = tmp_path_factory.mktemp("r50")
    checkpoint = _random_checkpoint(R50, tmp / "r50.safetensors")
    path = _export(R50, checkpoint, tmp / "r50.onnx", "--dynamic")
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    # batch, height and width are symbolic; the custom node is absent from the standard form
    assert all(isinstance(d, str) for d in dims["images"][:1] + dims["images"][2:]), dims
    assert not any(n.domain == CUSTOM_DOMAIN for n in proto.graph.node)
    # two images padded to one size, then a third image alone at another size
    _check_equal_to_eager(path, R50, checkpoint, [_batch(images[:2], 320, 480), _batch(images[2:], 256, 384)])


@pytest.mark.export_full
@pytest.mark.timeout(1800)
def test_swinl_onnx_runtime_equals_eager_at_two_small_fixed_sizes(tmp_path_factory, images):
    # Swin backbones export at a fixed size (symbolic sizes do not trace in reasonable time):
    # one file per size, batch symbolic; smaller images are padded up to the graph's size
    tmp = tmp_path_factory.mktemp("swinl")
    checkpoint = _random_checkpoint(SWINL, tmp / "swinl.safetensors")
    for height, width, batch in ((224, 320, _batch(images[:2], 192, 320)), (256, 352, _batch(images[2:], 256, 352))):
        path = _export(SWINL, checkpoint, tmp / f"swinl_{height}x{width}.onnx", "--height", str(height),
                       "--width", str(width))
        dims = OnnxDetector(path).session.get_inputs()[0].shape
        assert isinstance(dims[0], str) and dims[2:] == [height, width], dims
        images_, masks, sizes = batch
        pad = (0, width - images_.shape[-1], 0, height - images_.shape[-2])
        padded = (F.pad(images_, pad), F.pad(masks, pad, value=True), sizes)
        _check_equal_to_eager(path, SWINL, checkpoint, [padded])


def test_swin_backbones_refuse_symbolic_image_sizes(tmp_path):
    cfg = load_config(SWINL, SMALL_SWIN)
    cfg.model.backbone.pretrained_path = None
    with pytest.raises(ExportError, match="fixed image size only.*--height and --width"):
        export_onnx(build_dino(cfg.model), tmp_path / "swin.onnx", num_select=10, height=128, width=128,
                    dynamic=True)
    assert not list(tmp_path.iterdir())


def test_a_fixed_size_graph_pads_smaller_inputs_and_refuses_larger_ones():
    images, masks = np.ones((2, 3, 60, 70), np.float32), np.zeros((2, 60, 70), bool)
    padded, padded_masks = pad_to(images, masks, (64, 96))
    assert padded.shape == (2, 3, 64, 96) and padded[:, :, :60, :70].all() and not padded[:, :, 60:].any()
    assert not padded_masks[:, :60, :70].any() and padded_masks[:, 60:].all() and padded_masks[:, :, 70:].all()
    with pytest.raises(UserError, match="larger than the 64x64"):
        pad_to(images, masks, (64, 64))


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    return _random_checkpoint(DEMO, tmp_path_factory.mktemp("demo") / "demo.safetensors")


@pytest.mark.slow
def test_custom_op_form_has_one_documented_node_per_msda_call(tmp_path, demo_checkpoint):
    path = _export(DEMO, demo_checkpoint, tmp_path / "custom.onnx", "--msda", "custom",
                   "--height", "128", "--width", "160", "--opset", "20")
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    cfg = load_config(DEMO).model
    nodes = [n for n in proto.graph.node if n.domain == CUSTOM_DOMAIN]
    assert [n.op_type for n in nodes] == [CUSTOM_OP] * (cfg.enc_layers + cfg.dec_layers)
    assert {o.domain: o.version for o in proto.opset_import}[CUSTOM_DOMAIN] == 1
    assert {o.domain: o.version for o in proto.opset_import}[""] == 20
    points = [cfg.enc_n_points] * cfg.enc_layers + [cfg.dec_n_points] * cfg.dec_layers
    for node, n_points in zip(nodes, points):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"n_heads": cfg.num_heads, "head_dim": cfg.hidden_dim // cfg.num_heads,
                         "n_levels": cfg.num_feature_levels, "n_points": n_points}
        assert len(node.input) == 5 and len(node.output) == 1
    assert "GridSample" not in {n.op_type for n in proto.graph.node}
    fixed = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    batch = fixed[0][0]  # symbolic, whatever the size
    assert isinstance(batch, str) and fixed == [[batch, 3, 128, 160], [batch, 128, 160], [batch, 2]]


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory, demo_checkpoint) -> Path:
    # without onnxscript's optimizer (a third of the export's time); the custom-op test runs it
    return _export(DEMO, demo_checkpoint, tmp_path_factory.mktemp("demo_onnx") / "demo.onnx", "--dynamic",
                   "--skip-optimizer")


@pytest.mark.slow
def test_demo_model_onnx_runtime_equals_eager_at_two_sizes(demo_onnx, demo_checkpoint, images):
    # the export path of the R50 and Swin-L tests (dynamic sizes, gather attention, post-processing
    # in the graph) on the small demo model, cheap enough for every run of the suite
    batches = [_batch(images[:2], 192, 256), _batch(images[2:], 160, 224)]
    _check_equal_to_eager(demo_onnx, DEMO, demo_checkpoint, batches)


@pytest.mark.slow
def test_infer_draws_from_the_onnx_file(tmp_path, demo_onnx, images, capsys):
    path = demo_onnx
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(meta["dino_scale.categories"]) == CATEGORIES
    out = tmp_path / "drawn.png"
    assert infer.main([str(images[0]), "--onnx", str(path), "--out", str(out), "--threshold", "0",
                       "data.eval_size=192", "data.eval_max_size=256"]) == 0
    assert Image.open(out).size == Image.open(images[0]).size
    assert "50 detections above 0.0 drawn" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["mismatched checkpoint", "unsupported opset", "unwritable output"])
def test_bad_input_one_line_exit_2_no_file(case, tmp_path, demo_checkpoint, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = tmp_path / "model.onnx"
    args = {"mismatched checkpoint": ["--config", str(R50), "--checkpoint", str(demo_checkpoint)],
            "unsupported opset": ["--config", str(DEMO), "--checkpoint", str(demo_checkpoint), "--opset", "11"],
            "unwritable output": ["--config", str(DEMO), "--checkpoint", str(demo_checkpoint)]}[case]
    if case == "unwritable output":
        out = blocker / "model.onnx"
    assert run_command(export_main, "python -m dino_scale.export", ["onnx", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m dino_scale.export: error: "), err
    expected = {"mismatched checkpoint": "does not fit the model", "unsupported opset": "unsupported opset 11",
                "unwritable output": "cannot write"}[case]
    assert expected in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
