"""Training on modules: the QAT run (`run_quantization`), multi-crop soft labels, checkpoints, FP training."""

from .checkpoint import seed_everything
from .fp import FPResult, train_fp
from .loop import RunInterrupted
from .run import RunSession, check_launch, open_run, resolve_kd_mode, run_quantization
from .softlabels import MultiCropDataset, SoftLabelRun, SoftLabelStore, generate_soft_labels

__all__ = ["FPResult", "MultiCropDataset", "RunInterrupted", "RunSession", "SoftLabelRun", "SoftLabelStore", "check_launch", "generate_soft_labels",
           "open_run", "resolve_kd_mode", "run_quantization", "seed_everything", "train_fp"]
