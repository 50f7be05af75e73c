"""Variation statistics, module sensitivity, oscillation and bit allocation (`vitqtool analyze`)."""

from .compare import compare_reports, slug, table_rows, write_comparison
from .oscillation import oscillation_rows
from .pipeline import SCHEMA, analyze_model

__all__ = ["SCHEMA", "analyze_model", "compare_reports", "oscillation_rows", "slug", "table_rows", "write_comparison"]
