"""Data that ships offline with pysparse's dependencies, for calibration and evaluation without downloads."""
from .sentences import sentences

__all__ = ["sentences"]
