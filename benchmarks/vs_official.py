"""Training step of our DINO-4scale R50 against the official IDEA-Research/DINO code, side by side.

    git --git-dir=<fetched IDEA-Research/DINO> archive HEAD | tar x -C /tmp/official_dino
    python benchmarks/vs_official.py --official /tmp/official_dino [--size 480x640] [--images 2]

The official code runs from its own checkout, outside this repository, unmodified; this
script only adapts the process to a CPU (what a user without its CUDA extension would have
to do): its `MultiScaleDeformableAttention` extension is replaced by the official pure-PyTorch
`ms_deform_attn_core_pytorch`, tensors' `.cuda()` and `.to("cuda")` stay on the CPU, and the backbone does not
download ImageNet weights.

Both models are the official DINO-4scale R50 (`config/DINO/DINO_4scale.py`, dn box noise 1.0
as every official training script passes) with the same weights (ours converted to the
official layout with `ours_to_official`), fed the same batch, in float32 on the same threads.
One step = forward in training mode (denoising on, same seed on both sides) + the weighted
loss + backward + gradient clipping at 0.1 + AdamW with the official parameter groups. The
DeepSpeed engine of our trainer is left out on purpose: it is not model code and the
official code has no counterpart. Steps alternate between the two models; medians are
printed with their ratio, the loss of both (equal up to float error: the same model) and the
CPU's features.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_acceptance import synthetic_batch  # noqa: E402

from dino_scale.config import load_config  # noqa: E402
from dino_scale.engine.optim import build_param_groups  # noqa: E402
from dino_scale.hardware import cpu_features_line  # noqa: E402
from dino_scale.models import build_criterion, build_dino  # noqa: E402
from dino_scale.weights.official import ours_to_official  # noqa: E402

OUR_CONFIG = REPO / "configs" / "dino_r50_4scale_coco.yaml"
# Values of main.py's argparse defaults that build_dino reads, beside the config file.
MAIN_DEFAULTS = {"device": "cpu", "masks": False, "frozen_weights": None, "dataset_file": "coco",
                 "dn_box_noise_scale": 1.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a checkout of IDEA-Research/DINO (not inside this repo)")
    p.add_argument("--size", default="480x640", help="image HxW")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--boxes", type=int, default=10, help="boxes per image")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None, help="write the figures to this file")
    return p


def import_official(root: Path) -> types.ModuleType:
    """Import the official `models.dino` package from `root`, adapted to run on a CPU."""
    if (root.resolve() / "dino_scale").exists() or REPO in root.resolve().parents:
        raise SystemExit(f"--official {root}: use a checkout outside this repository")
    sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
    sys.path.insert(0, str(root))
    from models.dino.ops.functions import ms_deform_attn_func
    from models.dino.ops.modules import ms_deform_attn

    class PyTorchMSDA(torch.autograd.Function):  # the official CPU-capable formulation
        @staticmethod
        def apply(value, shapes, level_start, locations, weights, im2col_step):  # noqa: ARG004
            return ms_deform_attn_func.ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    ms_deform_attn.MSDeformAttnFunction = PyTorchMSDA
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    tensor_to = torch.Tensor.to

    def to_cpu_for_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and str(args[0]).startswith("cuda"):  # the official denoising code's .to('cuda')
            args = ("cpu", *args[1:])
        return tensor_to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu_for_cuda
    import models.dino.backbone as official_backbone
    official_backbone.is_main_process = lambda: False  # no ImageNet download
    import models.dino as official_dino
    return official_dino


def official_args(root: Path) -> argparse.Namespace:
    """The official run's arguments: config/DINO/DINO_4scale.py over its `_base_` files (plain
    Python assignments, read as the official SLConfig does) and main.py's defaults."""
    values: dict[str, Any] = {}

    def read(path: Path) -> None:
        scope: dict[str, Any] = {}
        exec(compile(path.read_text(), str(path), "exec"), scope)  # noqa: S102 (the user's own checkout)
        for base in scope.pop("_base_", []):
            read(path.parent / base)
        values.update({k: v for k, v in scope.items() if not k.startswith("__")})

    read(root / "config" / "DINO" / "DINO_4scale.py")
    values.update(MAIN_DEFAULTS)
    return argparse.Namespace(**values)


def make_step(model: torch.nn.Module, forward: Callable[..., dict], loss_fn: Callable[[dict, list], torch.Tensor],
              optimizer: torch.optim.Optimizer, batch: Any, seed: int) -> Callable[[], float]:
    """One training step of `model` on `batch`; the denoising noise is drawn from `seed`."""
    def step() -> float:
        torch.manual_seed(seed)
        outputs = forward(batch.images, batch.masks, batch.targets)
        loss = loss_fn(outputs, batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        return float(loss)
    return step


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.split("x"))
    root = Path(args.official)
    official = import_official(root)
    from util.misc import NestedTensor

    cfg = load_config(OUR_CONFIG, ["model.msda_impl=native"])
    ours = build_dino(cfg.model).train()
    our_criterion = build_criterion(cfg.model)
    theirs, their_criterion, _ = official.build_dino(official_args(root))
    theirs.train()
    missing, unexpected = theirs.load_state_dict(ours_to_official(ours.state_dict()), strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]

    batch = synthetic_batch(args.images, height, width, cfg.model.num_classes, args.boxes)
    weight_dict = their_criterion.weight_dict

    def their_loss(outputs: dict, targets: list) -> torch.Tensor:
        terms = their_criterion(outputs, targets)
        return sum(terms[k] * weight_dict[k] for k in terms if k in weight_dict)

    def official_forward(images, masks, targets):
        return theirs(NestedTensor(images, masks), targets)

    lr, lr_backbone, wd = cfg.optim.lr, cfg.optim.lr_backbone, cfg.optim.weight_decay
    their_groups = [
        {"params": [p for n, p in theirs.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in theirs.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": lr_backbone},
    ]
    steps = {
        "official": make_step(theirs, official_forward, their_loss,
                              torch.optim.AdamW(their_groups, lr=lr, weight_decay=wd), batch, seed=1),
        "ours": make_step(ours, ours, lambda o, t: our_criterion(o, t)["loss"],
                          torch.optim.AdamW(build_param_groups(ours, cfg.optim), lr=lr, weight_decay=wd),
                          batch, seed=1),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, {cpu_features_line()}")
    print(f"DINO-4scale R50 fp32, {args.images} images of {height}x{width}, {args.boxes} boxes each, "
          f"parameters ours {counts[0]:,} / official {counts[1]:,}")
    first_loss = {name: step() for name, step in steps.items()}  # warm-up 1: the same weights on both sides
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result: dict[str, Any] = {
        "size": [height, width], "images": args.images, "threads": args.threads, "cpu": cpu_features_line(),
        "seconds": median, "speedup": median["official"] / median["ours"], "first_loss": first_loss,
    }
    print(f"first-step loss: ours {first_loss['ours']:.6f}, official {first_loss['official']:.6f}")
    print(f"step (median of {args.steps}): ours {median['ours']:.3f} s, official {median['official']:.3f} s, "
          f"ours {result['speedup']:.2f}x faster")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
