"""QAT on accelerate (`quantize`), multi-crop soft labels (`softlabels`), run folders (`load_run_model`), FP training (`train_fp`)."""

from .checkpoint import RunModel, load_run_model
from .fp import train_fp
from .loop import RunInterrupted
from .run import quantize
from .softlabels import softlabels

__all__ = ["RunInterrupted", "RunModel", "load_run_model", "quantize", "softlabels", "train_fp"]
