"""U-Nets over the conv families, and their builders."""

from equiseg.models.build import PAPER_WIDTHS, build_model, count_macs, count_parameters, match_width, parameter_count
from equiseg.models.optimize import optimize_for_inference
from equiseg.models.unet import BlurPool2d, ConvFamily, Pooling, UNet, conv_block, model_class_channels, probabilities

__all__ = ["PAPER_WIDTHS", "BlurPool2d", "ConvFamily", "Pooling", "UNet", "build_model", "conv_block", "count_macs", "count_parameters",
           "match_width", "model_class_channels", "optimize_for_inference", "parameter_count", "probabilities"]
