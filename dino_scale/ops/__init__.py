"""Multi-scale deformable attention: the native op and its pure-PyTorch reference."""

from dino_scale.ops.reference import ms_deform_attn_reference

# Until the native op is built, the reference is the implementation.
ms_deform_attn = ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]
