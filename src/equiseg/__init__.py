"""equiseg: rotation-equivariant U-Nets for histopathology segmentation."""

from equiseg.groups import C4, D4, Group, GroupElement
from equiseg.models import ConvFamily, UNet, build_model, match_width, optimize_for_inference

__version__ = "0.1.0"
__all__ = ["C4", "D4", "ConvFamily", "Group", "GroupElement", "UNet", "build_model", "match_width",
           "optimize_for_inference"]
