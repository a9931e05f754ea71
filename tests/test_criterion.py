import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dino_scale.config import ModelConfig
from dino_scale.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from dino_scale.models.criterion import SetCriterion, build_criterion, denoising_indices, global_num_boxes

NUM_CLASSES = 5
LAYERS = 3


def small_cfg(**overrides) -> ModelConfig:
    cfg = ModelConfig(num_classes=NUM_CLASSES, dec_layers=LAYERS, num_queries=6)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def leaf(shape, generator, boxes=False) -> torch.Tensor:
    if boxes:
        value = torch.cat([torch.rand(*shape[:-1], 2, generator=generator) * 0.5 + 0.25,
                           torch.rand(*shape[:-1], 2, generator=generator) * 0.3 + 0.05], dim=-1)
    else:
        value = torch.randn(*shape, generator=generator)
    return value.requires_grad_()


def make_targets(sizes: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
            "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                                torch.rand(n, 2, generator=g) * 0.3 + 0.05], dim=-1),
        }
        for n in sizes
    ]


def make_outputs(batch: int, queries: int, sizes: list[int], dn: bool = True, seed: int = 0,
                 groups: int | None = None) -> dict:
    """A training-mode output dict as the model returns it, every tensor a leaf with grad."""
    g = torch.Generator().manual_seed(seed)

    def head(q):
        return {"pred_logits": leaf((batch, q, NUM_CLASSES), g), "pred_boxes": leaf((batch, q, 4), g, boxes=True)}

    outputs = head(queries)
    outputs["aux_outputs"] = [head(queries) for _ in range(LAYERS - 1)]
    outputs["enc_outputs"] = head(queries)
    if dn:
        max_targets = max(sizes)
        if max_targets:
            groups = groups or max(1, 10 // (2 * max_targets))
            single_pad = 2 * max_targets
        else:
            groups, single_pad = 1, 0
        pad = groups * single_pad
        outputs["dn_outputs"] = [head(pad) for _ in range(LAYERS)]
        outputs["dn_meta"] = {"pad_size": pad, "num_groups": groups, "single_pad": single_pad}
    return outputs


def leaves(outputs: dict) -> list[torch.Tensor]:
    found = []
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict) and key != "dn_meta":
            found.extend(leaves(value))
        elif isinstance(value, list):
            for item in value:
                found.extend(leaves(item))
    return found


def expected_names(aux: int, dn: bool, enc: bool) -> set[str]:
    terms = ("loss_ce", "loss_bbox", "loss_giou")
    names = {"loss", "class_error", *terms}
    names |= {f"{t}_{i}" for t in terms for i in range(aux)}
    if dn:
        names |= {f"{t}_dn" for t in terms} | {f"{t}_dn_{i}" for t in terms for i in range(aux)}
    if enc:
        names |= {f"{t}_enc" for t in terms}
    return names


# -- the focal term, by hand ----------------------------------------------------------------


def test_focal_loss_hand_worked():
    """Two queries, two classes, one target of class 1 at query 0's box: query 0 is matched."""
    criterion = SetCriterion(num_classes=2, matcher=build_criterion(small_cfg(num_classes=2)).matcher,
                             weight_dict={"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    logits = torch.tensor([[[0.5, 2.0], [-1.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    out = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    def positive(x):  # alpha (1 - p)^2 * -log p
        return 0.25 * (1 - sig(x)) ** 2 * -math.log(sig(x))

    def negative(x):  # (1 - alpha) p^2 * -log(1 - p)
        return 0.75 * sig(x) ** 2 * -math.log(1 - sig(x))

    expected_ce = negative(0.5) + positive(2.0) + negative(-1.0) + negative(0.0)  # num_boxes = 1
    assert out["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert out["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss_giou"].item() == pytest.approx(0.0, abs=1e-4)  # IoU eps 1e-6 on area 0.04
    assert out["class_error"].item() == 0.0
    expected_total = 1.0 * out["loss_ce"] + 5.0 * out["loss_bbox"] + 2.0 * out["loss_giou"]
    assert out["loss"].item() == pytest.approx(expected_total.item(), rel=1e-6)


def official_form_focal(logits, onehot, num_boxes, alpha=0.25, gamma=2.0):
    """The official expression: per-element focal, mean over queries, sum, / num_boxes * Q."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    loss = (alpha * onehot + (1 - alpha) * (1 - onehot)) * ce * (1 - p_t) ** gamma
    return loss.mean(1).sum() / num_boxes * logits.shape[1]


def test_terms_equal_the_official_forms():
    criterion = build_criterion(small_cfg())
    outputs = make_outputs(2, 6, [3, 2], dn=False, seed=1)
    final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    targets = make_targets([3, 2], seed=1)
    out = criterion(final, targets)
    indices = criterion.matcher(final, targets)
    onehot = torch.zeros(2, 6, NUM_CLASSES)
    src_boxes, tgt_boxes = [], []
    for b, (rows, cols) in enumerate(indices):
        onehot[b, rows, targets[b]["labels"][cols]] = 1
        src_boxes.append(final["pred_boxes"][b, rows])
        tgt_boxes.append(targets[b]["boxes"][cols])
    src, tgt = torch.cat(src_boxes), torch.cat(tgt_boxes)
    torch.testing.assert_close(out["loss_ce"], official_form_focal(final["pred_logits"], onehot, 5.0).detach())
    torch.testing.assert_close(out["loss_bbox"], ((src - tgt).abs().sum() / 5).detach())
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
    torch.testing.assert_close(out["loss_giou"], ((1 - giou).sum() / 5).detach())


# -- names, weights, total ------------------------------------------------------------------


def test_weight_dict_and_term_names():
    cfg = small_cfg(cls_loss_coef=1.0, bbox_loss_coef=5.0, giou_loss_coef=2.0)
    criterion = build_criterion(cfg)
    weights = criterion.weight_dict
    assert set(weights) == expected_names(LAYERS - 1, dn=True, enc=True) - {"loss", "class_error"}
    for name, weight in weights.items():
        family = name.split("_")[1]
        assert weight == {"ce": 1.0, "bbox": 5.0, "giou": 2.0}[family], name

    sizes = [3, 1]
    out = criterion(make_outputs(2, 6, sizes, seed=2), make_targets(sizes, seed=2))
    assert set(out) == expected_names(LAYERS - 1, dn=True, enc=True)
    total = sum(weights[k] * v for k, v in out.items() if k in weights)
    torch.testing.assert_close(out["loss"].detach(), total)
    assert out["loss"].requires_grad
    assert all(not v.requires_grad and v.dim() == 0 for k, v in out.items() if k != "loss")


def test_eval_outputs_give_final_terms_only():
    out = build_criterion(small_cfg())(
        {k: v for k, v in make_outputs(2, 6, [2, 2]).items() if k in ("pred_logits", "pred_boxes")},
        make_targets([2, 2]),
    )
    assert set(out) == expected_names(0, dn=False, enc=False)


def test_more_layers_than_configured_is_an_error():
    criterion = build_criterion(small_cfg(dec_layers=2))
    with pytest.raises(ValueError, match="no weight"):
        criterion(make_outputs(1, 6, [2]), make_targets([2]))


# -- denoising ------------------------------------------------------------------------------


def test_denoising_indices_hand_worked():
    targets = make_targets([2, 0, 1])
    indices = denoising_indices(targets, single_pad=4, num_groups=3)
    assert indices[0][0].tolist() == [0, 1, 4, 5, 8, 9]
    assert indices[0][1].tolist() == [0, 1, 0, 1, 0, 1]
    assert indices[1][0].tolist() == [] and indices[1][1].tolist() == []
    assert indices[2][0].tolist() == [0, 4, 8] and indices[2][1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="denoising group"):
        denoising_indices(make_targets([3]), single_pad=4, num_groups=1)


def test_denoising_loss_uses_exactly_the_positive_queries():
    sizes = [2, 1]
    targets = make_targets(sizes, seed=3)
    outputs = make_outputs(2, 6, sizes, seed=3, groups=3)
    single_pad = outputs["dn_meta"]["single_pad"]  # 4: positives at +0, +1; negatives at +2, +3
    positives = {(0, g * single_pad + j) for g in range(3) for j in range(2)} | {
        (1, g * single_pad) for g in range(3)
    }
    final_dn = outputs["dn_outputs"][-1]
    with torch.no_grad():  # put every positive query exactly on its target box
        for b, q in positives:
            final_dn["pred_boxes"][b, q] = targets[b]["boxes"][q % single_pad]
    out = build_criterion(small_cfg())(outputs, targets)
    assert out["loss_bbox_dn"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss_giou_dn"].item() == pytest.approx(0.0, abs=2e-4)  # the IoU eps
    assert out["loss_bbox_dn_0"].item() > 0.01

    out["loss"].backward()
    box_grad = final_dn["pred_boxes"].grad.abs().sum(-1)
    logit_grad = final_dn["pred_logits"].grad.abs().sum(-1)
    for b in range(2):
        for q in range(outputs["dn_meta"]["pad_size"]):
            if (b, q) not in positives:
                assert box_grad[b, q] == 0, (b, q)  # negatives and padding: no box loss
            assert logit_grad[b, q] > 0  # every dn query has a class term (negatives: background)
    # aux dn layer: its positives carry a box gradient
    aux_grad = outputs["dn_outputs"][0]["pred_boxes"].grad.abs().sum(-1)
    assert all(aux_grad[b, q] > 0 for b, q in positives)


def test_denoising_normalised_by_num_boxes_times_groups():
    sizes = [2, 1]
    targets = make_targets(sizes, seed=4)
    outputs = make_outputs(2, 6, sizes, seed=4, groups=3)
    out = build_criterion(small_cfg())(outputs, targets)
    dn = outputs["dn_outputs"][-1]
    indices = denoising_indices(targets, 4, 3)
    src = torch.cat([dn["pred_boxes"][b, rows] for b, (rows, _) in enumerate(indices)])
    tgt = torch.cat([targets[b]["boxes"][cols] for b, (_, cols) in enumerate(indices)])
    torch.testing.assert_close(out["loss_bbox_dn"], ((src - tgt).abs().sum() / (3 * 3)).detach())
    onehot = torch.zeros_like(dn["pred_logits"])
    for b, (rows, cols) in enumerate(indices):
        onehot[b, rows, targets[b]["labels"][cols]] = 1
    torch.testing.assert_close(out["loss_ce_dn"], official_form_focal(dn["pred_logits"], onehot, 9.0).detach())


def test_inconsistent_dn_meta_is_an_error():
    outputs = make_outputs(1, 6, [2], seed=5, groups=2)
    outputs["dn_meta"] = {"pad_size": 8, "num_groups": 3, "single_pad": 4}
    with pytest.raises(ValueError, match="dn_meta"):
        build_criterion(small_cfg())(outputs, make_targets([2]))


# -- empty images ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, dn",
    [
        ([0, 3], True),  # one image without boxes (or with crowd boxes only, removed upstream)
        ([0, 0], True),  # no boxes in the batch, denoising outputs with zero queries
        ([0, 0], False),  # no boxes in the batch, the model left denoising out
    ],
)
def test_zero_box_images_give_finite_losses_and_gradients(sizes, dn):
    criterion = build_criterion(small_cfg())
    outputs = make_outputs(2, 6, sizes, dn=dn, seed=6)
    out = criterion(outputs, make_targets(sizes, seed=6))
    assert set(out) == expected_names(LAYERS - 1, dn=True, enc=True)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for tensor in (outputs["pred_logits"], outputs["aux_outputs"][0]["pred_logits"],
                   outputs["enc_outputs"]["pred_logits"]):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    for tensor in leaves(outputs):
        assert tensor.grad is None or torch.isfinite(tensor.grad).all()
    if sum(sizes) == 0:
        # nothing to regress; background-only classification, normalised by the clamp to 1
        assert out["loss_bbox"] == 0 and out["loss_giou"] == 0 and out["loss_ce"] > 0
        assert out["class_error"] == 100


def test_nan_predictions_give_a_nan_loss_not_an_exception():
    outputs = make_outputs(2, 6, [2, 1], seed=9)
    with torch.no_grad():
        outputs["pred_boxes"][0, 0] = float("nan")
        outputs["aux_outputs"][0]["pred_logits"][1, 2, 3] = float("nan")
    out = build_criterion(small_cfg())(outputs, make_targets([2, 1], seed=9))
    assert not torch.isfinite(out["loss"])


def test_bad_targets_are_clear_errors():
    criterion = build_criterion(small_cfg())
    outputs = make_outputs(1, 6, [2], dn=False)
    targets = make_targets([2])
    targets[0]["labels"] = targets[0]["labels"].int()
    with pytest.raises(ValueError, match="int64"):
        criterion(outputs, targets)
    targets = make_targets([2])
    targets[0]["boxes"] = targets[0]["boxes"][:1]
    with pytest.raises(ValueError, match="boxes must be"):
        criterion(outputs, targets)
    targets = make_targets([2])
    targets[0]["labels"][1] = NUM_CLASSES
    with pytest.raises(ValueError, match="labels must lie"):
        criterion(outputs, targets)


# -- num_boxes across ranks -----------------------------------------------------------------


def test_num_boxes_is_clamped_and_scales_the_losses():
    assert global_num_boxes(make_targets([0, 0]), torch.device("cpu")) == 1.0
    assert global_num_boxes(make_targets([2, 3]), torch.device("cpu")) == 5.0
    criterion = build_criterion(small_cfg())
    outputs = make_outputs(2, 6, [2, 2], dn=False, seed=8)
    final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    targets = make_targets([2, 2], seed=8)
    single = criterion(final, targets)
    # the batch twice over: every sum doubles, and so does num_boxes
    doubled = criterion(
        {k: torch.cat([v, v]) for k, v in final.items()}, targets + targets
    )
    torch.testing.assert_close(doubled["loss_bbox"], single["loss_bbox"])
    torch.testing.assert_close(doubled["loss_ce"], single["loss_ce"])


def _rank_main(rank: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sizes = [[1, 0], [2, 1]][rank]  # 1 box on rank 0, 3 on rank 1: num_boxes = 2 on both
        targets = make_targets(sizes, seed=rank)
        num_boxes = global_num_boxes(targets, torch.device("cpu"))
        outputs = make_outputs(2, 6, sizes, dn=False, seed=rank)
        final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        criterion = build_criterion(small_cfg())
        out = criterion(final, targets)
        indices = criterion.matcher(final, targets)
        l1 = sum((final["pred_boxes"][b, r] - targets[b]["boxes"][c]).abs().sum() for b, (r, c) in enumerate(indices))
        ratio = float(out["loss_bbox"]) / float(l1)
        with open(f"{result_dir}/rank{rank}.json", "w") as f:
            json.dump({"num_boxes": num_boxes, "ratio": ratio}, f)
    finally:
        dist.destroy_process_group()


def test_num_boxes_sums_over_ranks_and_divides_by_world_size(monkeypatch):
    calls = []

    def fake_all_reduce(tensor, op=None):
        calls.append(op)
        tensor += 7.0  # the other ranks' boxes

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert global_num_boxes(make_targets([1, 0]), torch.device("cpu")) == 2.0
    assert calls == [dist.ReduceOp.SUM]
    # a rank with no boxes, all ranks empty: clamped to 1
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: None)
    assert global_num_boxes(make_targets([0]), torch.device("cpu")) == 1.0


@pytest.mark.slow
def test_num_boxes_all_reduced_over_ranks(tmp_path):
    """Two real gloo ranks on loopback (spawned: ~15 s on 2 cores, mostly imports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["num_boxes"] for r in results] == [2.0, 2.0]
    assert all(r["ratio"] == pytest.approx(0.5) for r in results)


# -- against the official SetCriterion ------------------------------------------------------

OFFICIAL_LOSSES = Path(__file__).resolve().parent / "data" / "official_criterion_losses.json"


def official_case(seed: int) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """Outputs of a 3-decoder-layer model (12 queries, 7 classes, 2 denoising groups of 6)
    and targets with 3, 0 and 2 boxes; the inputs of tests/data/official_criterion_losses.json."""
    classes, queries, layers, sizes, groups, single_pad = 7, 12, 3, [3, 0, 2], 2, 6
    g = torch.Generator().manual_seed(seed)

    def boxes(*lead):
        return torch.cat([torch.rand(*lead, 2, generator=g) * 0.6 + 0.2,
                          torch.rand(*lead, 2, generator=g) * 0.4 + 0.02], -1)

    def head(q):
        logits = (torch.randn(len(sizes), q, classes, generator=g) * 2).requires_grad_()
        return {"pred_logits": logits, "pred_boxes": boxes(len(sizes), q).requires_grad_()}

    outputs = head(queries)
    outputs["aux_outputs"] = [head(queries) for _ in range(layers - 1)]
    outputs["enc_outputs"] = head(queries)
    outputs["dn_outputs"] = [head(groups * single_pad) for _ in range(layers)]
    outputs["dn_meta"] = {"pad_size": groups * single_pad, "num_groups": groups, "single_pad": single_pad}
    targets = [{"labels": torch.randint(0, classes, (n,), generator=g), "boxes": boxes(n)} for n in sizes]
    return outputs, targets


@pytest.mark.parametrize("seed", range(3))
def test_every_term_equals_the_official_criterion(seed):
    """The official SetCriterion's terms on `official_case(seed)`, recorded by running the
    official code on CPU (see the file's "provenance"); its `_interm` terms are our `_enc`."""
    recorded = json.loads(OFFICIAL_LOSSES.read_text())
    outputs, targets = official_case(seed)
    criterion = build_criterion(ModelConfig(num_classes=7, dec_layers=3))
    official_weights = {k.replace("_interm", "_enc"): v for k, v in recorded["weight_dict"].items()}
    assert criterion.weight_dict == official_weights
    out = criterion(outputs, targets)
    expected = {k.replace("_interm", "_enc"): v for k, v in recorded["losses"][str(seed)].items()}
    assert set(out) == set(expected)
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
