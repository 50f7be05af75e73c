"""Variation statistics, module sensitivity, oscillation and bit allocation (`vitqtool analyze`)."""

from .pipeline import SCHEMA, analyze

__all__ = ["SCHEMA", "analyze"]
