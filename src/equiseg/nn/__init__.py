"""Equivariant layers: isotropic, group and steerable convolutions, group pooling and normalisation."""

from equiseg.nn.bank import ExpandedConv2d
from equiseg.nn.fold import fold_to_conv2d
from equiseg.nn.group_conv import GroupConv2d, LiftingConv2d
from equiseg.nn.group_ops import GroupBatchNorm2d, GroupPool, pool_over_group
from equiseg.nn.isotropic import IsotropicConv2d
from equiseg.nn.steerable import SteerableGroupConv2d, SteerableLiftingConv2d

__all__ = ["ExpandedConv2d", "GroupBatchNorm2d", "GroupConv2d", "GroupPool", "IsotropicConv2d", "LiftingConv2d",
           "SteerableGroupConv2d", "SteerableLiftingConv2d", "fold_to_conv2d", "pool_over_group"]
