"""Pure-torch quantization core: the quantizer interface and LSQ, quantized layers, calibration, packing (no timm here)."""

from .base import GRANULARITIES, MIN_STEP, QUANTIZERS, Quantizer, QuantSpec, make_quantizer, register_quantizer
from .calibrate import (calibrate, init_weight_steps, iter_quantizers, project_quantizers_, quantizers_disabled,
                        set_quantizers_enabled, set_quantizers_fused)
from .glu import QuantGLU
from .lsq import LSQQuantizer, check_fused_kernels
from .modules import QUANT_LAYERS, FusedProjections, QConv2d, QLinear, QuantAttention, QuantAttentionPool, attend, slice_rows
from .obr import obr_lambda, obr_loss, quant_layers
from .oscillation import OscillationTracker
from .overrides import apply_bit_overrides

__all__ = [
    "GRANULARITIES", "MIN_STEP", "QUANTIZERS", "Quantizer", "QuantSpec", "make_quantizer", "register_quantizer",
    "LSQQuantizer", "check_fused_kernels", "QLinear", "QConv2d", "QuantAttention", "QuantAttentionPool", "QuantGLU",
    "QUANT_LAYERS", "FusedProjections", "attend", "slice_rows",
    "apply_bit_overrides", "calibrate", "obr_lambda", "obr_loss", "quant_layers", "OscillationTracker",
    "init_weight_steps", "iter_quantizers", "project_quantizers_", "quantizers_disabled", "set_quantizers_enabled", "set_quantizers_fused",
]
