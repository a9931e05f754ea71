"""Typed configuration: dataclasses loaded from YAML with `_base_` inheritance and
`key.sub=value` command-line overrides.

A config file is a YAML mapping whose top-level keys are the sections of `Config`. It may
name other files under `_base_` (a path or a list of paths, relative to the file); those
are loaded first and the file's own keys are merged over them, mappings key by key, other
values replaced. Overrides (`optim.lr=2e-4`, `model.backbone.name=swin_large`) are applied
last; their values are parsed as YAML scalars/lists.

Every key is checked against the dataclasses: unknown keys and values of the wrong type
raise `ConfigError` naming the dotted key and where it came from (file or command line).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dino_scale.errors import UserError
from dino_scale.io import atomic_write_text


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and its source."""


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    # timm model name (features_only); "resnet50" and "swin_large_patch4_window12_384"
    # are the official DINO backbones.
    name: str = "resnet50"
    # local file with backbone weights (timm or torchvision layout); None = random init.
    pretrained_path: str | None = None
    # indices of the backbone stages fed to the transformer (official 4-scale: 1, 2, 3).
    return_stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    # ResNet: BatchNorm replaced by FrozenBatchNorm2d; stem + layer1 frozen.
    frozen_batchnorm: bool = True
    freeze_stem_and_first_stage: bool = True
    # Swin: activation checkpointing inside the backbone blocks.
    grad_checkpointing: bool = False
    drop_path_rate: float = 0.2
    # any extra timm constructor keyword arguments (e.g. reduced widths for the demo)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """DINO hyper-parameters; defaults are the official DINO-4scale R50 values."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 91
    hidden_dim: int = 256
    num_heads: int = 8
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 900
    position_temperature: float = 20.0
    # contrastive denoising
    dn_number: int = 100
    # 1.0: config/DINO/DINO_4scale.py (and DINO.__init__) say 0.4, but every official
    # training script (scripts/DINO_train*.sh) overrides it with `--options
    # dn_box_noise_scale=1.0`, and the authors name 1.0 as the value that reproduces the
    # published results (IDEA-Research/DINO issue #75). tests/data/official_recipe.json
    # records both.
    dn_box_noise_scale: float = 1.0
    dn_label_noise_ratio: float = 0.5
    # rows of the denoising label embedding minus one; None = num_classes (official default)
    dn_labelbook_size: int | None = None
    # matcher costs and loss weights
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    # activation checkpointing per part (the backbone's is backbone.grad_checkpointing): each
    # encoder / decoder layer's activations are recomputed in backward instead of kept; outputs
    # and gradients are unchanged (the RNG state is restored for the recomputation)
    checkpoint_encoder_layers: bool = False
    checkpoint_decoder_layers: bool = False
    # inference
    num_select: int = 300
    # multi-scale deformable attention implementation: "auto" (native op, else the
    # pure-PyTorch reference), "native", "reference" (grid_sample) or "gather" (the
    # indexing formulation that ONNX export uses)
    msda_impl: Literal["auto", "native", "reference", "gather"] = "auto"


@dataclass
class DataConfig:
    # training data: WebDataset shards (dir/s3 prefix or a manifest) or a COCO folder
    train_shards: str | None = None
    train_coco_images: str | None = None
    train_coco_annotations: str | None = None
    # evaluation data: a COCO folder (images + annotation JSON)
    val_images: str | None = None
    val_annotations: str | None = None
    # finite: each epoch reads every sample once, split over ranks/workers;
    # resampled: shards drawn with replacement, epoch of `samples_per_epoch` (multi-node)
    mode: Literal["finite", "resampled"] = "finite"
    samples_per_epoch: int | None = None
    # per loader worker: samples held (still JPEG-encoded) to shuffle within; shards
    # themselves are shuffled per epoch with the seed
    shuffle_buffer: int = 1000
    num_workers: int = 2
    # augmentation (official DETR/DINO values)
    train_scales: list[int] = field(
        default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    )
    train_max_size: int = 1333
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min_size: int = 384
    crop_max_size: int = 600
    eval_size: int = 800
    eval_max_size: int = 1333
    # stop with an error when more than this fraction of samples read is corrupt
    # (checked once at least `min_samples_for_bad_fraction` samples were read)
    max_bad_fraction: float = 0.01
    min_samples_for_bad_fraction: int = 100
    # DataLoader workers: "spawn" is safe next to threads (Ray, DeepSpeed, s3fs); "fork" starts faster
    multiprocessing_context: Literal["spawn", "fork", "forkserver"] = "spawn"
    prefetch_factor: int = 2
    pin_memory: bool = False
    # storage options for s3:// paths (endpoint etc.); credentials come from the
    # environment / AWS config, never from the config file.
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # parameter-name substrings whose lr is multiplied by `lr_linear_proj_mult`. 1.0: the
    # official DINO configs name these with 0.1 but choose param_dict_type 'default', whose
    # groups (util/get_param_dicts.py) ignore them: sampling offsets train at `lr`.
    lr_linear_proj_names: list[str] = field(
        default_factory=lambda: ["reference_points", "sampling_offsets"]
    )
    lr_linear_proj_mult: float = 1.0
    # parameter-name substrings that get `lr_backbone` (official DINO: "backbone.0")
    lr_backbone_names: list[str] = field(default_factory=lambda: ["backbone."])
    epochs: int = 12
    # total steps; when set it overrides epochs (resampled/pretraining runs)
    max_steps: int | None = None
    # step decay: lr *= gamma at each milestone (epochs, or steps when by == "step")
    lr_drop_milestones: list[int] = field(default_factory=lambda: [11])
    lr_drop_gamma: float = 0.1
    lr_schedule_by: Literal["epoch", "step"] = "epoch"
    warmup_steps: int = 0
    # NaN/Inf guard: stop after this many consecutive skipped steps
    max_consecutive_skipped_steps: int = 10


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_per_gpu: int = 2
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 0.1
    # DeepSpeed's own log interval (its "steps_per_print")
    steps_per_print: int = 1000
    # raw keys merged into the generated DeepSpeed JSON config (expert knobs)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetricsConfig:
    enabled: bool = True
    # each rank serves on base_port + local_rank; 0 picks a free port
    base_port: int = 9400
    bind_address: str = "127.0.0.1"
    log_every_steps: int = 20
    # histogram buckets (seconds) for step and data-wait times
    step_seconds_buckets: list[float] = field(
        default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    )


@dataclass
class TrainConfig:
    seed: int = 42
    checkpoint_every_steps: int = 1000
    keep_last_checkpoints: int = 3
    eval_every_epochs: int = 1
    eval_every_steps: int | None = None
    # load model weights (dino-scale or official DINO checkpoint) before training
    pretrained: str | None = None
    # allow unpickling arbitrary objects from pretrained files (official .pth files
    # hold an argparse.Namespace); off by default
    allow_unsafe_pickle: bool = False
    # categories the pretrained weights were trained on: a COCO JSON or a shard
    # manifest.json with `categories`; None = taken from the export's metadata (official
    # checkpoints carry none: then class rows start from scratch unless this is given)
    pretrained_categories: str | None = None
    # resume automatically from the latest complete checkpoint in paths.output_dir
    auto_resume: bool = True
    # a resume whose global batch (micro x accumulation x ranks) differs from the checkpoint's
    # is refused unless true; then the LR schedule and max_steps follow samples, not steps
    allow_global_batch_change: bool = False
    # write <output_dir>/export/model.safetensors (consolidated fp32) at the end
    export_at_end: bool = True
    # evaluate at the end of training (needs data.val_images/val_annotations)
    eval_at_end: bool = True
    # score threshold for pictures drawn by launch/infer.py and the demo
    draw_score_threshold: float = 0.3


@dataclass
class PathsConfig:
    output_dir: str = "outputs/run"
    # when None, logs go to <output_dir>/logs
    log_dir: str | None = None
    # when None, checkpoints go to <output_dir>/checkpoints
    checkpoint_dir: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

COMMAND_LINE = "command line"


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load `path` (with its `_base_` chain), apply `key.sub=value` overrides, validate."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        tree, sources = _load_tree(Path(path), chain=())
    return config_from_tree(tree, overrides, sources)


def config_from_tree(tree: dict[str, Any], overrides: Sequence[str] = (),
                     sources: dict[str, str] | None = None) -> Config:
    """A `Config` from a nested mapping (e.g. a saved `config_to_dict`) with `key.sub=value`
    overrides applied on top."""
    tree = copy.deepcopy(tree)
    sources = dict(sources or {})
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
        sources[key] = COMMAND_LINE
    return build_config(tree, sources)


def build_config(tree: dict[str, Any], sources: dict[str, str] | None = None) -> Config:
    """Turn a nested mapping into a validated `Config`."""
    return _to_dataclass(Config, tree, prefix="", sources=sources or {})


# storage-option names (fsspec/s3fs/botocore) whose values are credentials
SECRET_OPTION_KEYS = frozenset({
    "key", "secret", "token", "password", "access_key", "secret_key", "session_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
})
REDACTED = "<redacted>"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (YAML/JSON serialisable). Credentials in
    `storage_options` are replaced by "<redacted>": this dict is what gets saved
    (config.yaml, checkpoints, exports)."""
    return _redact_storage_options(dataclasses.asdict(cfg), inside=False)


def _redact_storage_options(value: Any, inside: bool) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if inside and k in SECRET_OPTION_KEYS and v is not None
                else _redact_storage_options(v, inside or k == "storage_options")
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_storage_options(v, inside) for v in value]
    return value


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _load_tree(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: circular _base_ chain: {' -> '.join(map(str, chain))}")
    if not path.is_file():
        where = f" (named as _base_ by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for base in bases:
        base_tree, base_sources = _load_tree(path.parent / base, chain + (path,))
        deep_merge(tree, base_tree)
        sources.update(base_sources)
    deep_merge(tree, data)
    for key in _dotted_keys(data):
        sources[key] = str(path)
    return tree, sources


def deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Merge `src` into `dst` key by key, nested dicts recursively (values deep-copied)."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            deep_merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, dotted + "."))
    return keys


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} from the command line must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} from the command line has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key!r} from the command line: cannot parse {raw!r}: {exc}") from exc
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _source_of(key: str, sources: dict[str, str]) -> str:
    probe = key
    while probe:
        if probe in sources:
            src = sources[probe]
            return "the command line" if src == COMMAND_LINE else src
        probe = probe.rpartition(".")[0]
    return "defaults"


def _to_dataclass(cls: type, tree: Any, prefix: str, sources: dict[str, str]) -> Any:
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        where = prefix.rstrip(".") or "<top level>"
        raise ConfigError(
            f"config key '{where}' (from {_source_of(where, sources)}) must be a mapping, "
            f"got {type(tree).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"unknown config key '{key}' (from {_source_of(key, sources)}); "
            f"known keys under '{prefix.rstrip('.') or '<top level>'}': {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in tree.items():
        kwargs[name] = _convert(hints[name], value, f"{prefix}{name}", sources)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ checks
        raise ConfigError(f"section '{prefix.rstrip('.')}': {exc}") from exc


def _convert(hint: Any, value: Any, key: str, sources: dict[str, str]) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"config key '{key}' (from {_source_of(key, sources)}) must be {expected}, "
            f"got {value!r} ({type(value).__name__})"
        )

    if dataclasses.is_dataclass(hint):
        return _to_dataclass(hint, value, key + ".", sources)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key, sources)
            except ConfigError:
                pass
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        raise fail(names)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list of {_type_name(args[0]) if args else 'values'}")
        inner = args[0] if args else Any
        return [_convert(inner, item, f"{key}[{i}]", sources) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return copy.deepcopy(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    raise ConfigError(f"config key '{key}': unsupported field type {hint!r}")


def _type_name(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )
