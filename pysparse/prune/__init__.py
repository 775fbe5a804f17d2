"""Pruning: masks from criteria (magnitude L1/L2, Taylor, Wanda, SparseGPT) x patterns (unstructured, block, N:M,
channel), held through training, on one-shot or gradual schedules; sparsity-inducing penalties; recovery by
fine-tuning or distillation. Imports neither pysparse.nn nor pysparse.ops."""
from .channels import ChannelPruningReport, apply_channel_surgery, channel_surgery_record, prune_channels
from .criteria import taylor_scores, wanda_scores
from .mask_holding import (
    apply_masks,
    get_masks,
    mask_sparsity,
    masks_from_state_dict,
    prunable_layers,
    prune_,
    remove_masks,
)
from .mask_selection import NORMS, PATTERNS, magnitude_mask
from .recovery import distill, fine_tune
from .regularize import SparsityRegularizer
from .schedules import GradualSchedule
from .sparsegpt import sparsegpt_

__all__ = [
    "NORMS", "PATTERNS", "ChannelPruningReport", "GradualSchedule", "SparsityRegularizer", "apply_channel_surgery",
    "apply_masks", "channel_surgery_record", "distill", "fine_tune", "get_masks", "magnitude_mask", "mask_sparsity",
    "masks_from_state_dict", "prunable_layers", "prune_", "prune_channels", "remove_masks", "sparsegpt_",
    "taylor_scores", "wanda_scores",
]
