"""Variation statistics, module sensitivity, oscillation and bit allocation (`vitqtool analyze`)."""

from .oscillation import oscillation_rows
from .pipeline import SCHEMA, analyze_model

__all__ = ["SCHEMA", "analyze_model", "oscillation_rows"]
