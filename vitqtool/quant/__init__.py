"""Pure-torch quantization core: LSQ quantizers, quantized layers, calibration, packing (no timm here)."""

from .calibrate import calibrate, init_weight_steps, iter_quantizers, quantizers_disabled, set_quantizers_enabled, set_quantizers_fused
from .lsq import MIN_STEP, LSQQuantizer, QuantSpec, check_fused_kernels
from .modules import QUANT_LAYERS, QConv2d, QLinear, QuantAttention
from .obr import obr_lambda, obr_loss, quant_layers, weight_step
from .oscillation import OscillationTracker
from .overrides import apply_bit_overrides

__all__ = [
    "MIN_STEP", "LSQQuantizer", "QuantSpec", "check_fused_kernels", "QLinear", "QConv2d", "QuantAttention", "QUANT_LAYERS",
    "apply_bit_overrides", "calibrate", "obr_lambda", "obr_loss", "quant_layers", "weight_step", "OscillationTracker", "init_weight_steps", "iter_quantizers", "quantizers_disabled", "set_quantizers_enabled", "set_quantizers_fused",
]
