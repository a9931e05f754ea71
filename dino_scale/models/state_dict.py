"""The one message for weights that do not fit a module: what is missing, unexpected, or
of the wrong shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def shape_mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """`"name (shape in state) vs (expected shape)"` for every common key whose shapes differ."""
    return [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
            for k in expected if k in state and state[k].shape != expected[k].shape]


def describe_mismatch(missing: Sequence[str], unexpected: Sequence[str], wrong_shape: Sequence[str] = (),
                      shown: int = 8) -> str:
    """"missing a, b ... (12 in all); unexpected c; wrong shape d (1, 2) vs (3, 2)"; empty
    when everything fits."""
    def show(items: Sequence[str]) -> str:
        return ", ".join(items[:shown]) + (f" ... ({len(items)} in all)" if len(items) > shown else "")

    parts = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
    return "; ".join(f"{label} {show(items)}" for label, items in parts if items)
