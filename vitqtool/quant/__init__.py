"""Pure-torch quantization core: the quantizer interface and LSQ, quantized layers, calibration, packing (no timm here)."""

from .base import GRANULARITIES, MIN_STEP, QUANTIZERS, Quantizer, QuantSpec, make_quantizer, register_quantizer
from .calibrate import (
                        calibrate,
                        init_weight_steps,
                        iter_quantizers,
                        project_quantizers_,
                        quantizers_disabled,
                        set_quantizers_enabled,
                        set_quantizers_fused,
)
from .glu import QuantGLU
from .lsq import FusedMismatch, LSQQuantizer, check_fused_kernels
from .modules import QUANT_LAYERS, FusedProjections, QConv2d, QLinear, QuantAttention, QuantAttentionPool, attend, slice_rows, split_heads
from .obr import obr_lambda, obr_loss, quant_layers
from .oscillation import OscillationTracker
from .overrides import apply_bit_overrides
from .reconstruct import ReconstructSettings, SoftRounding, block_mse, reconstruct_block
from .reparam import channel_factors, channel_ranges, fold_norm_scale_

__all__ = [
                        "GRANULARITIES",
                        "MIN_STEP",
                        "QUANTIZERS",
                        "QUANT_LAYERS",
                        "FusedMismatch",
                        "FusedProjections",
                        "LSQQuantizer",
                        "OscillationTracker",
                        "QConv2d",
                        "QLinear",
                        "QuantAttention",
                        "QuantAttentionPool",
                        "QuantGLU",
                        "QuantSpec",
                        "Quantizer",
                        "ReconstructSettings",
                        "SoftRounding",
                        "apply_bit_overrides",
                        "attend",
                        "block_mse",
                        "calibrate",
                        "channel_factors",
                        "channel_ranges",
                        "check_fused_kernels",
                        "fold_norm_scale_",
                        "init_weight_steps",
                        "iter_quantizers",
                        "make_quantizer",
                        "obr_lambda",
                        "obr_loss",
                        "project_quantizers_",
                        "quant_layers",
                        "quantizers_disabled",
                        "reconstruct_block",
                        "register_quantizer",
                        "set_quantizers_enabled",
                        "set_quantizers_fused",
                        "slice_rows",
                        "split_heads",
]
