"""Pruning: masks from criteria x patterns, applied to models and held during fine-tuning."""
