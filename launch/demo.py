"""`make demo`: the whole system on generated data, end to end, on a laptop.

1. generate an "Objects365-like" pretraining set and a "COCO-like" fine-tuning set
   (COCO JSON + JPEGs, `launch/demo_data.py`);
2. Ray builds WebDataset shards of both training sets (`data_pipeline.build_shards`);
3. the DeepSpeed launcher pretrains the small DINO with 2 CPU ranks and ZeRO-2;
4. the same launcher fine-tunes it on the COCO-like set (class rows transferred by name)
   and evaluates it with pycocotools on the held-out val set;
5. prints the AP table and writes a detections picture, a loss-curve plot and
   `outputs/demo/summary.json`.

Every stage is the same command a user runs on a cluster; this script only chains them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from demo_data import DemoSplit, generate_demo_data
from dino_scale.config import load_config
from dino_scale.engine.distributed import free_port
from dino_scale.engine.evaluator import format_table
from dino_scale.engine.inference import detect, draw_detections, names_for
from dino_scale.errors import UserError, exit_process, run_command
from dino_scale.io import atomic_write_text
from dino_scale.log import get_logger, setup_logging
from dino_scale.weights import load_model

log = get_logger("dino_scale.demo")

REPO = Path(__file__).resolve().parents[1]


def _env(num_ranks: int) -> dict[str, str]:
    env = dict(os.environ)
    # one rank per core: torch's default (all cores per process) oversubscribes the CPU
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_ranks)))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("DINO_NO_PROGRESS", "1")
    return env



def _training_command(deepspeed: str, ranks: int, script: str, config: str, epochs: int | None,
                      arguments: list[str]) -> list[str]:
    """`deepspeed` running launch/`script` with configs/demo/`config` on `ranks` CPU ranks."""
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), f"launch/{script}",
           "--config", f"configs/demo/{config}", *arguments]
    return cmd + ([f"optim.epochs={epochs}"] if epochs is not None else [])

def _run(cmd: list[str], log_path: Path, env: dict[str, str]) -> None:
    """Run a stage, its output teed to `log_path`; a failure names the log."""
    log.info("$ %s", " ".join(cmd))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if " INFO [rank 0] dino_scale" in line or " WARNING " in line or "Error" in line:
                sys.stderr.write(line)
        code = proc.wait()
    if code != 0:
        raise UserError(f"stage failed with exit status {code}: {' '.join(cmd[:4])} ... (log: {log_path})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="outputs/demo", help="everything goes here (wiped first)")
    parser.add_argument("--pretrain-images", type=int, default=480)
    parser.add_argument("--finetune-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--num-ranks", type=int, default=2, help="DeepSpeed ranks (CPU processes here)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides applied to both training stages")
    return parser


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_intermixed_args(argv))
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage in turn; returns what `summary.json` holds."""
    setup_logging()
    started = time.perf_counter()
    out = (REPO / args.output).resolve() if not Path(args.output).is_absolute() else Path(args.output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stages: dict[str, float] = {}
    env = _env(args.num_ranks)
    py = sys.executable
    deepspeed = str(Path(py).parent / "deepspeed")

    tick = time.perf_counter()
    splits = generate_demo_data(out / "data", pretrain_images=args.pretrain_images,
                                finetune_train_images=args.finetune_images, val_images=args.val_images)
    stages["generate_data"] = time.perf_counter() - tick
    log.info("generated %s", {k: v.num_images for k, v in splits.items()})

    tick = time.perf_counter()
    shards = {}
    for name in ("pretrain", "finetune_train"):
        shards[name] = out / "shards" / name
        _run([py, "-m", "data_pipeline.build_shards", "--annotations", str(splits[name].annotations),
              "--images", str(splits[name].images), "--output", str(shards[name]),
              "--samples-per-shard", "100", "--num-cpus", "2", "--object-store-mb", "128"],
             out / "logs" / f"shards_{name}.log", env)
    stages["build_shards"] = time.perf_counter() - tick

    tick = time.perf_counter()
    pre_dir = out / "pretrain"
    _run(_training_command(deepspeed, args.num_ranks, "pretrain_o365.py", "pretrain.yaml", args.pretrain_epochs,
                           [f"data.train_shards={shards['pretrain']}", f"paths.output_dir={pre_dir}",
                            *args.overrides]),
         out / "logs" / "pretrain.log", env)
    stages["pretrain"] = time.perf_counter() - tick

    tick = time.perf_counter()
    ft_dir = out / "finetune"
    val = splits["finetune_val"]
    _run(_training_command(deepspeed, args.num_ranks, "finetune_coco.py", "finetune.yaml", args.finetune_epochs,
                           ["--pretrained", str(pre_dir / "export" / "model.safetensors"),
                            f"data.train_shards={shards['finetune_train']}", f"data.val_images={val.images}",
                            f"data.val_annotations={val.annotations}", f"paths.output_dir={ft_dir}",
                            *args.overrides]),
         out / "logs" / "finetune.log", env)
    stages["finetune_and_eval"] = time.perf_counter() - tick

    tick = time.perf_counter()
    pre_summary = json.loads((pre_dir / "train_summary.json").read_text())
    ft_summary = json.loads((ft_dir / "train_summary.json").read_text())
    stats = ft_summary["last_eval"]
    table = format_table(stats)
    picture = draw_examples(ft_dir / "export" / "model.safetensors", val, out / "detections.png", args.overrides)
    plot_losses({"pretrain": pre_dir / "train_log.jsonl", "finetune": ft_dir / "train_log.jsonl"},
                out / "loss_curve.png")
    stages["report"] = time.perf_counter() - tick

    images = pre_summary["images"] + ft_summary["images"]
    seconds = pre_summary["seconds"] + ft_summary["seconds"]
    summary = {
        "ap": stats["AP"], "ap50": stats["AP50"], "ap75": stats["AP75"],
        "coco_eval": stats,
        "wall_seconds": time.perf_counter() - started,
        "stage_seconds": stages,
        "steps": {"pretrain": pre_summary["step"], "finetune": ft_summary["step"]},
        "images_per_second": {"pretrain": pre_summary["images_per_second"],
                              "finetune": ft_summary["images_per_second"],
                              "overall": args.num_ranks * images / seconds if seconds else None},
        "ranks": args.num_ranks,
        "val_images": val.num_images,
        "outputs": {"detections": str(picture), "loss_curve": str(out / "loss_curve.png"),
                    "pretrained_export": str(pre_dir / "export" / "model.safetensors"),
                    "finetuned_export": str(ft_dir / "export" / "model.safetensors")},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(f"\nFine-tuned small DINO on the demo val set ({val.num_images} images), COCO bbox AP (%):")
    print(table)
    print(f"\nwall time {summary['wall_seconds']:.0f} s  "
          + "  ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    print(f"summary: {out / 'summary.json'}\ndetections: {picture}\nloss curve: {out / 'loss_curve.png'}")
    return summary


def draw_examples(checkpoint: Path, val: DemoSplit, out_path: Path, overrides: list[str], rows: int = 2,
                  columns: int = 3, scale: float = 3.0) -> Path:
    """The fine-tuned model's detections on the first `rows * columns` val images, in a grid,
    each image enlarged `scale` times."""
    config = str(REPO / "configs/demo/finetune.yaml")
    cfg = load_config(config, overrides)
    model = load_model(config, checkpoint, overrides)
    names = names_for(checkpoint, None)
    tiles = []
    tmp = out_path.parent / "detections_tiles"
    for image_path in sorted(Path(val.images).iterdir())[:rows * columns]:
        tile = tmp / f"{image_path.stem}.png"
        draw_detections(image_path, detect(model, image_path, cfg), tile,
                        threshold=cfg.train.draw_score_threshold, names=names, scale=scale)
        tiles.append(Image.open(tile))
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (columns * width, rows * height))
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % columns) * width, (index // columns) * height))
    sheet.save(out_path)
    shutil.rmtree(tmp, ignore_errors=True)
    return out_path


def plot_losses(logs: dict[str, Path], out_path: Path) -> None:
    fig = Figure(figsize=(5 * len(logs), 3.5))
    axes = fig.subplots(1, len(logs))
    for ax, (name, path) in zip(axes, logs.items()):
        records = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            records[r["step"]] = r  # a resumed run rewrites its steps: keep the last
        steps = sorted(records)
        ax.plot(steps, [records[s]["loss"] for s in steps], label="total (weighted)")
        for term in ("loss_ce", "loss_bbox", "loss_giou"):
            if steps and term in records[steps[0]]["terms"]:
                ax.plot(steps, [records[s]["terms"][term] for s in steps], label=term, linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)


if __name__ == "__main__":
    exit_process(run_command(main, "launch/demo.py"))
