"""Official IDEA-Research/DINO checkpoints <-> dino-scale weights.

Official files are torch pickles `{'model': state_dict, 'args': argparse.Namespace, ...}`;
ours are safetensors in our parameter naming (see `dino_scale.engine.export`). The names
differ in three places:

- the backbone: official `backbone.0.body.*` (ResNet) is our `backbone.body.*`; official Swin
  `backbone.0.layers.i.downsample` (PatchMerging at the end of stage i) is timm's
  `backbone.body.layers.{i+1}.downsample` (start of the next stage), and the official
  per-output LayerNorms `backbone.0.norm{i}` are our `backbone.norms.{i}`;
- the shared heads: official `class_embed.{i}`, `bbox_embed.{i}` and
  `transformer.decoder.{class,bbox}_embed.{i}` are one tensor under 2 * dec_layers names,
  ours is stored once as `class_embed` / `bbox_embed`;
- Swin `relative_position_index` is a derived constant: official files store it, our model
  computes it; conversion checks it instead of copying it.

Everything else keeps the official name.

CLI: `python -m dino_scale.checkpoint_convert official-to-ours IN.pth OUT.safetensors`
     `python -m dino_scale.checkpoint_convert ours-to-official IN.safetensors OUT.pth`
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from dino_scale.io import atomic_write_with
from dino_scale.log import get_logger

log = get_logger(__name__)

UNSAFE_FLAG = "--allow-unsafe-pickle"
_HEAD_ALIAS = re.compile(r"^(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.\d+\.(.+)$")
_SWIN_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_SWIN_NORM = re.compile(r"^norm(\d+)\.(.+)$")
DERIVED_SUFFIXES = ("relative_position_index",)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says why."""


# ---------------------------------------------------------------------------------------
# key mapping
# ---------------------------------------------------------------------------------------


def swin_official_to_timm_key(key: str) -> str:
    """Official (Microsoft) Swin key -> timm key: PatchMerging moves to the next stage."""
    m = _SWIN_DOWNSAMPLE.match(key)
    if m:
        return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    return key


def swin_timm_to_official_key(key: str) -> str:
    m = _SWIN_DOWNSAMPLE.match(key)
    if m:
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    return key


def official_to_ours_key(key: str) -> str:
    """The name of official key `key` in our model (several official names may share one)."""
    m = _HEAD_ALIAS.match(key)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    if key.startswith("backbone.0.body."):
        return "backbone.body." + key[len("backbone.0.body."):]
    if key.startswith("backbone.0."):
        rest = key[len("backbone.0."):]
        m = _SWIN_NORM.match(rest)
        if m:
            return f"backbone.norms.{m.group(1)}.{m.group(2)}"
        return "backbone.body." + swin_official_to_timm_key(rest)
    return key


def ours_to_official_keys(key: str, num_decoder_layers: int) -> list[str]:
    """All official names of our key `key` (2 * dec_layers names for a shared head)."""
    head, _, rest = key.partition(".")
    if head in ("class_embed", "bbox_embed"):
        return [f"{prefix}{head}.{i}.{rest}" for prefix in ("", "transformer.decoder.")
                for i in range(num_decoder_layers)]
    if key.startswith("backbone.norms."):
        stage, _, rest = key[len("backbone.norms."):].partition(".")
        return [f"backbone.0.norm{stage}.{rest}"]
    if key.startswith("backbone.body."):
        rest = key[len("backbone.body."):]
        if rest.startswith(("patch_embed.", "layers.")):  # Swin
            return ["backbone.0." + swin_timm_to_official_key(rest)]
        return ["backbone.0.body." + rest]  # ResNet
    return [key]


def relative_position_index(window: int) -> torch.Tensor:
    """[window**2, window**2] index into the (2*window-1)**2 relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


# ---------------------------------------------------------------------------------------
# state-dict conversion
# ---------------------------------------------------------------------------------------


def official_to_ours(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> ours. Aliases of a shared head must hold equal values (an
    official model trained without head sharing cannot be represented: error); derived
    Swin buffers are checked against their definition and dropped."""
    ours: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, tensor in official.items():
        if key.endswith(DERIVED_SUFFIXES):
            window = int(round(tensor.shape[0] ** 0.5))
            if not torch.equal(tensor.long(), relative_position_index(window)):
                raise CheckpointError(f"{key}: not the standard relative position index of window {window}")
            continue
        if key.endswith("num_batches_tracked"):
            continue
        name = official_to_ours_key(key)
        if name in ours:
            if ours[name].shape != tensor.shape or not torch.equal(ours[name], tensor):
                raise CheckpointError(
                    f"{key} and {source[name]} are both {name} in this model (shared decoder heads) "
                    "but hold different values: checkpoints with unshared heads are not supported"
                )
            continue
        ours[name] = tensor
        source[name] = key
    return ours


def ours_to_official(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> official names (shared heads under every alias, as one tensor;
    Swin relative position indices regenerated)."""
    layers = {int(m.group(1)) for k in ours if (m := re.match(r"transformer\.decoder\.layers\.(\d+)\.", k))}
    num_decoder_layers = max(layers) + 1 if layers else 0
    official: dict[str, torch.Tensor] = {}
    for key, tensor in ours.items():
        for name in ours_to_official_keys(key, num_decoder_layers):
            official[name] = tensor
        if key.endswith("attn.relative_position_bias_table"):
            window = (int(round(tensor.shape[0] ** 0.5)) + 1) // 2
            prefix = ours_to_official_keys(key, num_decoder_layers)[0][: -len("relative_position_bias_table")]
            official[prefix + "relative_position_index"] = relative_position_index(window)
    return official


# ---------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------


def read_official(path: str | Path, allow_unsafe_pickle: bool = False) -> dict[str, Any]:
    """Load an official `.pth` without running arbitrary pickled code.

    Tensors, containers and `argparse.Namespace` (the official 'args') are allowed; any other
    object is refused unless `allow_unsafe_pickle` (CLI `--allow-unsafe-pickle`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if allow_unsafe_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as exc:  # truncated or not a torch file
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: {exc}") from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and argparse.Namespace, which could run "
            f"code when loaded; if you trust the file pass {UNSAFE_FLAG} "
            f"(config: train.allow_unsafe_pickle=true). Details: {str(exc).splitlines()[0]}"
        ) from exc


def is_official(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and any(
        k.startswith(("transformer.", "backbone.0.")) for k in obj["model"]
    )


def read_weights(path: str | Path, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict from either format, detected by the file's contents."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        from dino_scale.engine.export import load_weights

        state, meta = load_weights(path)
        if meta.get("format") not in (None, "dino-scale"):
            raise CheckpointError(f"{path}: safetensors of format {meta.get('format')!r}, not dino-scale")
        return state
    obj = read_official(path, allow_unsafe_pickle)
    if not is_official(obj):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: neither dino-scale safetensors nor an official DINO checkpoint ({keys})")
    return official_to_ours(obj["model"])


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object
    return len(head) > 9 and head[8:9] == b"{"


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load with an error listing what does not fit (names and shapes)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        raise CheckpointError(
            "checkpoint does not fit the model: "
            + "; ".join(part for part in (
                f"missing {show(missing)}" if missing else "",
                f"unexpected {show(unexpected)}" if unexpected else "",
                f"wrong shape {show(wrong)}" if wrong else "",
            ) if part)
        )
    model.load_state_dict(state, strict=True)


def load_model(config_path: str | Path, checkpoint_path: str | Path, overrides: Sequence[str] = (),
               allow_unsafe_pickle: bool = False) -> torch.nn.Module:
    """Eval-mode DINO built from `config_path` (+ overrides) with the weights of a dino-scale
    safetensors file or an official DINO `.pth`."""
    from dino_scale.config import load_config
    from dino_scale.models import build_dino

    cfg = load_config(config_path, overrides)
    cfg.model.backbone.pretrained_path = None  # the checkpoint holds the backbone
    model = build_dino(cfg.model)
    state = read_weights(checkpoint_path, allow_unsafe_pickle or cfg.train.allow_unsafe_pickle)
    load_state_into(model, state)
    return model.eval()


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dino_scale.checkpoint_convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("official-to-ours", help="official DINO .pth -> dino-scale safetensors")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument(UNSAFE_FLAG, action="store_true", help="allow arbitrary pickled objects in SRC")
    b = sub.add_parser("ours-to-official", help="dino-scale safetensors -> official DINO .pth ({'model': ...})")
    b.add_argument("src")
    b.add_argument("dst")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "official-to-ours":
            obj = read_official(args.src, args.allow_unsafe_pickle)
            if not is_official(obj):
                raise CheckpointError(f"{args.src}: not an official DINO checkpoint (no 'model' state dict)")
            state = official_to_ours(obj["model"])
            from dino_scale.engine.export import save_weights

            save_weights({k: v.contiguous() for k, v in state.items()}, args.dst,
                         {"source": f"official DINO checkpoint {Path(args.src).name}"})
            print(f"wrote {len(state)} tensors to {args.dst}")
        else:
            state = read_weights(args.src)
            official = ours_to_official(state)
            atomic_write_with(args.dst, lambda f: torch.save({"model": official}, f))
            print(f"wrote {len(official)} official keys to {args.dst}")
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
