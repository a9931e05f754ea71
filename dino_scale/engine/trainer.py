"""The DeepSpeed training loop shared by pretraining and fine-tuning.

One optimizer step = `gradient_accumulation_steps` micro-batches per rank, fetched together
(`dino_scale.data.layout.StepLoader`: the same micro-batches make up each global step
whatever the number of ranks):

1. fetch the step's micro-batches; one all-reduce tells every rank whether any rank ran out
   of data (end of the epoch for all: ranks never wait on a collective the others skipped)
   or was asked to stop (SIGTERM: checkpoint, then exit), and counts the step's images and
   target boxes;
2. per micro-batch: seed the random draws from the micro-batch's key (denoising noise,
   dropout), forward + loss, normalised by the step's boxes per micro-batch (the official
   normaliser, boxes averaged over ranks, taken over the whole step: the gradient is the
   same sum over the global batch / its box count under any split into ranks and
   micro-batches); a second all-reduce tells whether the loss is finite on every rank. If
   not, no rank calls backward: the step is skipped and counted, and after
   `optim.max_consecutive_skipped_steps` skips in a row training stops with an error;
3. `engine.backward`, `engine.step` (DeepSpeed accumulates and clips at 0.1; the trainer
   marks the step's last micro-batch as the accumulation boundary). A finite loss can still
   have non-finite gradients: under ZeRO 1-3 DeepSpeed's overflow check refuses such a step
   (`was_step_applied()`, counted as skipped too); ZeRO-0 has no such check in fp32/bf16,
   so there the trainer checks the reduced gradients before `engine.step`. The logged loss
   terms are the step's means over all ranks and micro-batches.

Checkpoints every `train.checkpoint_every_steps` optimizer steps, on SIGTERM, and at the
end; a run resumes by itself from the latest complete one in the checkpoint directory, on
any number of ranks (elastic resume): weights and optimizer state are re-partitioned
(`checkpoint.CheckpointManager.load`), and the loader continues the epoch from the position
every rank had *trained* (the state after the last completed optimizer step, not what was
prefetched or fetched since). With the same micro-batch and global batch the run keeps the
data layout of its first start (`DataLayout`): the steps after the resume train the samples
the uninterrupted run would have; otherwise the rest of the epoch is split anew (no sample
twice, none skipped) and the new layout holds from then on. The global sample count is the truth: the schedule counts
optimizer steps of the run's first global batch (`schedule_steps` advances by
global batch / first global batch per step, i.e. by 1 while it is unchanged); a resume
that changes the global batch is refused unless `train.allow_global_batch_change`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from torch import nn

from dino_scale import models
from dino_scale.config import Config, config_to_dict
from dino_scale.data import ResumableLoader, build_eval_loader, build_train_loader
from dino_scale.data.categories import dataset_categories
from dino_scale.data.layout import DataLayout, MicroBatch, StepLoader, saved_positions
from dino_scale.engine import distributed as dist_utils
from dino_scale.engine.batching import outputs_to_float
from dino_scale.engine.checkpoint import (
    CheckpointManager,
    IncompatibleCheckpointError,
    ResumeSource,
    capture_rng_state,
    check_compatible,
    latest_complete,
    restore_rng_state,
    tag_for_step,
)
from dino_scale.engine.ds_config import build_deepspeed_config, global_batch, global_batch_change_refusal
from dino_scale.engine.evaluator import evaluate
from dino_scale.engine.optim import apply_lr, build_optimizer, build_param_groups, lr_factor
from dino_scale.engine.preemption import Preemption, release_frames
from dino_scale.engine.zero3 import prepare_for_zero3
from dino_scale.io import atomic_write_text
from dino_scale.log import get_logger
from dino_scale.metrics import TrainingMetrics
from dino_scale.weights.transfer import load_pretrained
from dino_scale.weights.zero import export_checkpoint

log = get_logger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: a job controller must not see "succeeded"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss."""


@dataclass
class Components:
    """What the trainer trains; defaults are built from the config. Tests pass their own."""

    model: nn.Module | None = None
    criterion: Callable[[Any, list[dict]], dict[str, torch.Tensor]] | None = None
    # (epoch, rank, world_size) -> the loader of that rank of a run of world_size ranks
    # (default: the config's data); the trainer asks for other ranks' loaders after an elastic resume
    train_loader: Callable[[int, int, int], ResumableLoader] | None = None
    # () -> eval loader over this rank's share, or None when there is no eval set
    eval_loader: Callable[[], Iterable[Any] | None] | None = None
    postprocess: nn.Module | None = None
    # categories of the training data, recorded in exports (fine-tuning matches by name)
    categories: list[dict[str, Any]] | None = None


@dataclass
class TrainResult:
    step: int
    epoch: int
    preempted: bool
    skipped_steps: int
    images: int
    seconds: float
    last_eval: dict[str, float] | None
    best_ap: float | None
    export_path: str | None
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: Config, components: Components | None = None) -> None:
        self.cfg = cfg
        self.components = components or Components()
        self.output_dir = Path(cfg.paths.output_dir)
        self.checkpoint_root = Path(cfg.paths.checkpoint_dir or self.output_dir / "checkpoints")
        self.checkpoints = CheckpointManager(self.checkpoint_root, cfg.train.keep_last_checkpoints)
        self.log_file = self.output_dir / "train_log.jsonl"
        self.micro_batch = cfg.deepspeed.micro_batch_per_gpu
        self.accum = cfg.deepspeed.gradient_accumulation_steps
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self.preemption = Preemption()
        # set up by setup() / run(), once torch.distributed is initialised
        self.rank, self.world = 0, 1
        self.device = torch.device("cpu")
        self.param_groups: list[dict[str, Any]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.ds_config: dict[str, Any] = {}
        self.engine: Any = None  # deepspeed.DeepSpeedEngine
        self.metrics: TrainingMetrics | None = None
        self.transfer_report: dict[str, Any] | None = None
        # progress, saved in client_state
        self.step = 0
        self.epoch = 0
        self.skipped_total = 0
        self.consecutive_skipped = 0
        self.best_ap: float | None = None
        self.last_eval: dict[str, float] | None = None
        self.images_seen = 0  # over all ranks
        self.train_seconds = 0.0
        self.global_batch = 0  # micro x accumulation x ranks, set in _build
        self.schedule_batch = 0  # the global batch of the run's first start: the schedule's unit
        self.schedule_steps = 0.0  # optimizer steps of schedule_batch samples trained so far
        self.resume_source: ResumeSource | None = None
        self.data_layout: DataLayout | None = None  # the split of the global batch that orders the data
        self._trained_position: dict[str, Any] | None = None  # loader state after the last finished step
        self._iterator: Any = None

    # ---------------------------------------------------------------- set-up

    def _build(self) -> None:
        cfg = self.cfg
        dist_utils.init_distributed()
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.device = dist_utils.device()
        dist_utils.seed_everything(cfg.train.seed)
        comp = self.components
        if comp.model is None:
            comp.model = models.build_dino(cfg.model)
        if comp.criterion is None:
            comp.criterion = models.build_criterion(cfg.model)
        if comp.postprocess is None:
            comp.postprocess = models.PostProcess(cfg.model.num_select)
        if comp.eval_loader is None:
            comp.eval_loader = self._default_eval_loader
        if comp.categories is None:
            comp.categories = dataset_categories(cfg.data)
        model = comp.model.to(self.device)
        self.global_batch = self.schedule_batch = global_batch(self.cfg.deepspeed, self.world)
        self.data_layout = DataLayout(self.world, self.micro_batch, self.accum, cfg.data.num_workers)
        self.resume_source = self.checkpoints.resume_source() if cfg.train.auto_resume else None
        if self.resume_source is not None:
            check_compatible(self.resume_source.directory, config_to_dict(cfg))
        if cfg.train.pretrained and latest_complete(self.checkpoint_root) is None:
            self.transfer_report = load_pretrained(
                model, cfg.train.pretrained, target_categories=comp.categories,
                pretrained_categories=cfg.train.pretrained_categories,
                allow_unsafe_pickle=cfg.train.allow_unsafe_pickle,
            )
        if isinstance(comp.criterion, nn.Module):
            comp.criterion.to(self.device)
        self.param_groups = build_param_groups(model, cfg.optim)
        self.optimizer = build_optimizer(self.param_groups, cfg.optim)
        self.ds_config = build_deepspeed_config(cfg, self.world)
        if self.resume_source is not None and self.resume_source.universal:
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        if cfg.deepspeed.zero_stage == 3:
            prepare_for_zero3(model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=self.ds_config
        )
        if self.dtype != torch.float32:
            # DeepSpeed casts parameters, not buffers (frozen BatchNorm statistics)
            for buf in self.engine.module.buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.to(self.dtype)
        self.metrics = TrainingMetrics(cfg.metrics, self.rank, dist_utils.local_rank())
        self.metrics.serve(self.output_dir / "metrics")

    def _canonical_loader(self, epoch: int, layout: DataLayout, rank: int) -> ResumableLoader:
        """The loader of rank `rank` of `layout` (this rank's own when the layout is this run's)."""
        if self.components.train_loader is not None:
            return self.components.train_loader(epoch, rank, layout.ranks)
        data = self.cfg.data
        if data.num_workers != layout.workers:
            data = dataclasses.replace(data, num_workers=layout.workers)
        return build_train_loader(data, batch_size=layout.micro_batch, rank=rank, world_size=layout.ranks,
                                  seed=self.cfg.train.seed, epoch=epoch)

    def _default_eval_loader(self) -> Iterable[Any] | None:
        if not (self.cfg.data.val_images and self.cfg.data.val_annotations):
            return None
        return build_eval_loader(self.cfg.data, batch_size=self.micro_batch, rank=self.rank,
                                 world_size=self.world)

    # ---------------------------------------------------------------- checkpoints

    def _client_state(self) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "skipped_total": self.skipped_total,
            "consecutive_skipped": self.consecutive_skipped, "best_ap": self.best_ap,
            "images_seen": self.images_seen, "train_seconds": self.train_seconds,
            "global_batch": self.global_batch, "schedule_batch": self.schedule_batch,
            "schedule_steps": self.schedule_steps, "config": config_to_dict(self.cfg),
            "data_layout": self.data_layout.as_dict(),
        }

    def save_checkpoint(self) -> Path:
        started = time.perf_counter()
        rank_state = {"rng": capture_rng_state(), "loader": self._trained_position}
        directory = self.checkpoints.save(self.engine, self.step, self._client_state(), rank_state)
        seconds = time.perf_counter() - started
        self.metrics.checkpoint_seconds.observe(seconds)
        log.info("checkpoint %s saved in %.1f s", directory, seconds)
        return directory

    def _checkpoint_now(self) -> Path:
        """A complete checkpoint of the current step (saved unless it exists already)."""
        found = latest_complete(self.checkpoint_root)
        if found is not None and found[0] == self.step:
            return found[1]
        return self.save_checkpoint()

    def _resume(self) -> list[dict[str, Any]] | None:
        """Restore from `self.resume_source`; returns every saved rank's loader position (None
        when there is no checkpoint or it was taken between epochs)."""
        source = self.resume_source
        if source is None:
            return None
        restored = self.checkpoints.load(self.engine, source)
        client = restored.client_state
        self._check_global_batch(client, restored.saved_world)
        for key in ("step", "epoch", "skipped_total", "consecutive_skipped", "best_ap",
                    "images_seen", "train_seconds", "schedule_batch", "schedule_steps"):
            if key in client:
                setattr(self, key, client[key])
        if "schedule_steps" not in client:  # a checkpoint from before the schedule followed samples
            self.schedule_steps = float(self.step)
        saved_layout = DataLayout(**client["data_layout"]) if client.get("data_layout") else None
        if saved_layout is not None and saved_layout.serves(self.world, self.micro_batch, self.accum):
            self.data_layout = saved_layout
            if saved_layout.workers != self.cfg.data.num_workers:
                log.warning("data.num_workers=%d not applied: the run's data layout reads each of its %d loaders "
                            "with %d workers (the sample order depends on it)", self.cfg.data.num_workers,
                            saved_layout.ranks, saved_layout.workers)
        elif saved_layout is not None:
            log.info("data layout %s -> %s: the rest of the epoch is split anew", saved_layout, self.data_layout)
        log.info("resumed from %s: step %d, epoch %d, %d images trained", source.directory, self.step,
                 self.epoch, self.images_seen)
        own = restored.rank_state
        if restored.saved_world != self.world or self.data_layout != saved_layout:
            # another layout continues from the positions of every saved rank
            states = self.checkpoints.rank_states(source)
            own = states[self.rank] if self.rank < len(states) else None
        else:
            states = [own] if own is not None else None  # its own loaders' positions suffice
        if own is not None:
            restore_rng_state(own["rng"])
        else:  # a rank the checkpoint did not have: its own stream, the same on every such resume
            dist_utils.seed_everything(self.cfg.train.seed + 7919 * self.rank + self.step)
        if states is None or any(s.get("loader") is None for s in states):
            return None
        return [s["loader"] for s in states]

    def _check_global_batch(self, client: dict[str, Any], saved_world: int) -> None:
        saved = int(client.get("global_batch") or self.global_batch)
        if saved == self.global_batch:
            return
        if not self.cfg.train.allow_global_batch_change:
            raise IncompatibleCheckpointError(
                global_batch_change_refusal(saved, saved_world, self.cfg.deepspeed, self.world))
        log.warning("global batch %d -> %d (train.allow_global_batch_change): the LR schedule and max_steps "
                    "follow samples, in steps of %s images", saved, self.global_batch,
                    client.get("schedule_batch", saved))

    # ---------------------------------------------------------------- loop

    def _schedule_step(self) -> int:
        """Optimizer steps of the first global batch trained so far (= self.step unless the
        global batch changed)."""
        return int(self.schedule_steps + 1e-6)

    def _done(self) -> bool:
        max_steps = self.cfg.optim.max_steps
        if max_steps is not None:
            return self._schedule_step() >= max_steps
        return self.epoch >= self.cfg.optim.epochs

    def setup(self) -> None:
        """Build model, engine, metrics (also what benchmarks use without the loop)."""
        self._build()

    def run(self) -> TrainResult:
        # SIGTERM is blocked from here on (loader workers started later inherit that) and
        # polled once per optimizer step: see dino_scale.engine.preemption.
        with self.preemption:
            try:
                self._build()
                return self._run()
            except BaseException as exc:
                release_frames(exc)
                raise
            finally:
                self.metrics_shutdown()

    def metrics_shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.shutdown()

    def _run(self) -> TrainResult:
        saved = self._resume()
        self.metrics.observe_run(self.step, self.images_seen)
        preempted = False
        while not self._done():
            loader = self._epoch_loader(saved)
            self._trained_position = loader.state_dict()
            saved = None
            self.metrics.epoch.set(self.epoch)
            try:
                outcome = self._train_epoch(loader)
            finally:
                self._close_iterator()
            if outcome == "preempted":
                preempted = True
                break
            if outcome == "epoch_end":
                log.info("epoch %d data: %s", self.epoch, loader.stats())
                self.epoch += 1
                every = self.cfg.train.eval_every_epochs
                if every and self.epoch % every == 0 and not self._done():
                    self._evaluate_and_track()
        if preempted:
            self.save_checkpoint()
            return self._result(preempted=True, export_path=None)
        self._checkpoint_now()
        if self.cfg.train.eval_at_end:
            self._evaluate_and_track()
        export_path = self.export() if self.cfg.train.export_at_end else None
        return self._result(preempted=False, export_path=export_path)

    def _step_loader(self, layout: DataLayout, relayouts: int = 0) -> StepLoader:
        return StepLoader(lambda rank: self._canonical_loader(self.epoch, layout, rank), layout, rank=self.rank,
                          world=self.world, accumulation=self.accum, epoch=self.epoch, relayouts=relayouts)

    def _epoch_loader(self, saved: list[dict[str, Any]] | None) -> StepLoader:
        """This epoch's loader: from its start, or, resumed mid-epoch, after the steps every saved
        rank had trained: in the saved data layout when this run can serve it, else over the
        rest of the epoch split anew in this run's layout."""
        positions = saved_positions(saved) if saved else None
        if positions is None or positions.epoch != self.epoch:
            return self._step_loader(self.data_layout)
        if positions.layout == self.data_layout:
            loader = self._step_loader(self.data_layout, positions.relayouts)
            loader.load_positions(positions.loaders, positions.steps)
            return loader
        old = positions.layout
        loader = self._step_loader(self.data_layout, positions.relayouts + 1)
        (own,) = loader.loaders.values()  # this run's own layout: one loader, this rank's
        if old.ranks == self.world and old.micro_batch == self.micro_batch and old.workers == self.data_layout.workers:
            own.load_state_dict(positions.loaders[self.rank])  # each rank continues its own share
            return loader
        resume_from_ranks = getattr(own, "resume_from_ranks", None)
        if resume_from_ranks is None:
            raise IncompatibleCheckpointError(
                f"{type(own).__name__} cannot continue an epoch in another data layout (no resume_from_ranks)")
        resume_from_ranks([positions.loaders[c] for c in range(old.ranks)])
        return loader

    def _train_epoch(self, loader: StepLoader) -> str:
        """Returns "epoch_end", "done" (step budget reached) or "preempted"."""
        iterator = self._iterator = iter(loader)
        while True:
            if self._done():
                return "done"
            tick = time.perf_counter()
            step = None
            if not self.preemption.poll():
                try:
                    step = next(iterator)
                except StopIteration:
                    step = None
                except Exception:
                    if not self.preemption.requested:  # loader workers die with us on SIGTERM
                        raise
            data_wait = time.perf_counter() - tick
            stop_requested = self.preemption.poll()
            targets = [t for micro in step for t in micro.batch.targets] if step else []
            exhausted, stop, images_all_ranks, boxes_all_ranks = dist_utils.all_reduce_sum(
                [float(step is None and not stop_requested), float(stop_requested), float(len(targets)),
                 float(sum(len(t["labels"]) for t in targets))],
                self.device,
            )
            if stop > 0:
                log.warning("stop requested (SIGTERM): checkpointing at step %d", self.step)
                return "preempted"
            if exhausted > 0:
                return "epoch_end"
            # the official normaliser (a micro-batch's boxes, averaged over ranks), over the whole step
            num_boxes = max(boxes_all_ranks / (self.world * self.accum), 1.0)
            terms = self._train_step(step, num_boxes, loader)
            step_seconds = time.perf_counter() - tick
            self.train_seconds += step_seconds
            if terms is None:
                continue
            self.images_seen += int(images_all_ranks)  # trained: a skipped step's images are not
            self._trained_position = loader.state_dict()
            self.consecutive_skipped = 0
            self.step += 1
            self.schedule_steps += self.global_batch / self.schedule_batch
            self.metrics.observe_data(loader.stats())
            self.metrics.observe_run(self.step, self.images_seen)
            self._log_step(terms, step_seconds, data_wait, len(targets))
            self.metrics.steps.inc()  # last: a scrape that sees the step sees all its metrics
            if self.step % self.cfg.train.checkpoint_every_steps == 0:
                self.save_checkpoint()
            if self.cfg.train.eval_every_steps and self.step % self.cfg.train.eval_every_steps == 0:
                self._evaluate_and_track()

    def _train_step(self, step: list[MicroBatch], num_boxes: float, loader: StepLoader) -> dict[str, float] | None:
        """Forward, backward and the optimizer step over this rank's micro-batches of one
        global step; returns the loss terms' means over all ranks and micro-batches, or None
        when the step was skipped."""
        engine = self.engine
        apply_lr(self.optimizer, lr_factor(self.cfg.optim, self._schedule_step(), self.epoch))
        sums: dict[str, float] = {}
        for i, micro in enumerate(step):
            boundary = i == len(step) - 1
            engine.set_gradient_accumulation_boundary(boundary)
            torch.manual_seed(micro.key)  # the micro-batch's draws, whatever the layout
            batch = micro.batch.to(self.device, dtype=self.dtype, non_blocking=True)
            outputs = engine(batch.images, batch.masks, batch.targets)
            losses = self.components.criterion(outputs_to_float(outputs), batch.targets, num_boxes=num_boxes)
            loss = losses["loss"]
            (nonfinite,) = dist_utils.all_reduce_sum([float(not torch.isfinite(loss).item())], self.device)
            if nonfinite > 0:
                self._skip(f"non-finite loss on {int(nonfinite)} rank(s)", loader)
                return None
            engine.backward(loss)
            if boundary and self.cfg.deepspeed.zero_stage == 0 and not self._gradients_finite():
                self._skip("non-finite gradients", loader)
                return None
            engine.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        if not engine.was_step_applied():
            self._skip("DeepSpeed refused the step (non-finite gradients)", loader)
            return None
        names = sorted(sums)
        means = dist_utils.all_reduce_sum([sums[n] for n in names], self.device)
        return {n: m / (self.world * len(step)) for n, m in zip(names, means)}

    def _close_iterator(self) -> None:
        """Stop the loader's workers now. After an exception the traceback would keep them
        alive until exit, where the interpreter waits for them: they block SIGTERM, so the
        rank (and the job) would hang instead of failing."""
        close = getattr(self._iterator, "close", None)
        self._iterator = None
        if close is not None:
            close()

    def _gradients_finite(self) -> bool:
        """Whether every rank's reduced gradients are finite (one norm, one all-reduce)."""
        grads = [g for p in self.engine.module.parameters()
                 if p.requires_grad and (g := safe_get_full_grad(p)) is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        (nonfinite,) = dist_utils.all_reduce_sum([float(not finite)], self.device)
        return nonfinite == 0

    def _skip(self, why: str, loader: StepLoader) -> None:
        self._trained_position = loader.state_dict()  # read and given up on: not to be read again
        self.skipped_total += 1
        self.consecutive_skipped += 1
        self.metrics.skipped_steps.inc()
        log.warning("step %d skipped: %s (%d in a row, %d in total)", self.step, why,
                    self.consecutive_skipped, self.skipped_total)
        self.engine.zero_grad()
        limit = self.cfg.optim.max_consecutive_skipped_steps
        if self.consecutive_skipped >= limit:
            raise NonFiniteLossError(
                f"{self.consecutive_skipped} consecutive steps skipped ({why}) at step {self.step}, "
                f"epoch {self.epoch}: training diverged (lower optim.lr, check the data, or resume "
                f"from an earlier checkpoint); limit optim.max_consecutive_skipped_steps={limit}"
            )

    def _log_step(self, terms: dict[str, float], step_seconds: float, data_wait: float, images: int) -> None:
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        self.metrics.observe_step(losses=terms, lrs=lrs, grad_norm=grad_norm, images=images,
                                  step_seconds=step_seconds, data_wait_seconds=data_wait)
        if self.rank != 0:
            return
        record = {"step": self.step, "epoch": self.epoch, "images": self.images_seen, "loss": terms["loss"],
                  "terms": terms, "lr": lrs, "grad_norm": grad_norm,
                  "step_seconds": step_seconds, "data_wait_seconds": data_wait,
                  "images_per_second": images * self.world / step_seconds if step_seconds else None}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.step % self.cfg.metrics.log_every_steps == 0 or self.step == 1:
            main = {k: round(v, 4) for k, v in terms.items() if k in ("loss", "loss_ce", "loss_bbox", "loss_giou")}
            log.info("epoch %d step %d %s lr %.2e grad_norm %s %.2f s/step (data %.2f s)",
                     self.epoch, self.step, main, max(lrs.values()),
                     f"{grad_norm:.3f}" if grad_norm is not None else "-", step_seconds, data_wait)

    # ---------------------------------------------------------------- eval / export

    def _evaluate_and_track(self) -> dict[str, float] | None:
        eval_loader = self.components.eval_loader()
        if eval_loader is None:
            return None
        eval_dir = self.output_dir / "eval"
        stats = evaluate(
            self.engine.module, eval_loader, self.cfg.data.val_annotations,
            postprocess=self.components.postprocess, device=self.device, dtype=self.dtype,
            output_json=eval_dir / f"step_{self.step}.json" if self.rank == 0 else None,
        )
        self.last_eval = stats
        self.metrics.observe_eval({k: stats[k] for k in ("AP", "AP50", "AP75")})
        if self.best_ap is None or stats["AP"] > self.best_ap:
            self.best_ap = stats["AP"]
            directory = self._checkpoint_now()
            if self.rank == 0:
                self._export_tag(directory.name, self.output_dir / "export" / "best.safetensors")
                atomic_write_text(self.output_dir / "best.json", json.dumps(
                    {"step": self.step, "epoch": self.epoch, "checkpoint": str(directory), **stats},
                    indent=2))
            dist_utils.barrier()
        return stats

    def _export_tag(self, tag: str, out: Path) -> Path:
        return export_checkpoint(
            self.checkpoint_root, tag, self.cfg.deepspeed.zero_stage, out,
            metadata={"categories": self.components.categories, "step": self.step,
                      "config": config_to_dict(self.cfg)},
        )

    def export(self) -> str:
        """Consolidated fp32 safetensors of the latest checkpoint (rank 0 writes it)."""
        out = self.output_dir / "export" / "model.safetensors"
        if self.rank == 0:
            self._export_tag(tag_for_step(self.step), out)
        dist_utils.barrier()
        return str(out)

    def _result(self, *, preempted: bool, export_path: str | None) -> TrainResult:
        result = TrainResult(
            step=self.step, epoch=self.epoch, preempted=preempted, skipped_steps=self.skipped_total,
            images=self.images_seen, seconds=self.train_seconds, last_eval=self.last_eval,
            best_ap=self.best_ap, export_path=export_path,
        )
        if self.rank == 0:
            summary = dict(result.__dict__)
            summary["images_per_second"] = self.images_seen / self.train_seconds if self.train_seconds else None
            atomic_write_text(self.output_dir / "train_summary.json", json.dumps(summary, indent=2))
        return result


def train(cfg: Config, components: Components | None = None) -> TrainResult:
    """Train per `cfg` (called on every rank)."""
    return Trainer(cfg, components).run()
