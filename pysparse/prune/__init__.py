"""Pruning: masks from criteria (magnitude L1/L2, Taylor, Wanda) x patterns (unstructured, block, N:M, channel),
held through training, on one-shot or gradual schedules. Imports neither pysparse.nn nor pysparse.ops."""
from .channel_surgery import ChannelPruningReport, apply_channel_surgery, channel_surgery_record, prune_channels
from .criteria import taylor_scores, wanda_scores
from .mask_holding import (apply_masks, get_masks, mask_sparsity, masks_from_state_dict, prunable_layers, prune_,
                           remove_masks)
from .mask_selection import NORMS, PATTERNS, magnitude_mask
from .recovery import fine_tune
from .schedules import GradualSchedule

__all__ = [
    "magnitude_mask", "prune_", "remove_masks", "apply_masks", "get_masks", "masks_from_state_dict",
    "mask_sparsity", "prunable_layers", "GradualSchedule", "fine_tune", "taylor_scores", "wanda_scores",
    "PATTERNS", "NORMS", "prune_channels", "channel_surgery_record", "apply_channel_surgery",
    "ChannelPruningReport",
]
