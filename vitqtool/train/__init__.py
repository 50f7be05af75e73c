"""Training on modules: the QAT run (`run_quantization`), multi-crop soft labels, checkpoints, FP training."""

from .fp import FPResult, train_fp
from .loop import RunInterrupted
from .run import RunSession, open_run, resolve_kd_mode, run_quantization, seed_everything
from .softlabels import MultiCropDataset, SoftLabelStore, generate_soft_labels

__all__ = ["FPResult", "MultiCropDataset", "RunInterrupted", "RunSession", "SoftLabelStore", "generate_soft_labels",
           "open_run", "resolve_kd_mode", "run_quantization", "seed_everything", "train_fp"]
