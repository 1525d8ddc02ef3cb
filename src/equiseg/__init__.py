"""equiseg: rotation-equivariant U-Nets for histopathology segmentation (OCELOT 2023).

The public surface: the symmetry groups, the model families and their builders, run configs,
trained models, and the library function behind each main command (train, tune detection,
evaluate, predict, export). `import equiseg` stays light (torch and the models): the functions
that need Lightning or the inference stack are imported on first use.
"""

import importlib
from typing import TYPE_CHECKING, Any

from equiseg.config import Config
from equiseg.groups import C4, D4, Group, GroupElement
from equiseg.models import ConvFamily, Pooling, UNet, build_model, match_width, optimize_for_inference, parameter_count
from equiseg.nn import fold_to_conv2d
from equiseg.presets import load_config
from equiseg.runs import Run, load_model

if TYPE_CHECKING:  # what `__getattr__` below imports on first use, named for type checkers
    from equiseg.evaluation.evaluate import evaluate_run
    from equiseg.evaluation.tune_detect import tune_detection
    from equiseg.export import export_model
    from equiseg.inference.predict import predict_run
    from equiseg.training.fit import fit

__version__ = "0.1.0"
__all__ = ["C4", "D4", "Config", "ConvFamily", "Group", "GroupElement", "Pooling", "Run", "UNet", "build_model",
           "evaluate_run", "export_model", "fit", "fold_to_conv2d", "load_config", "load_model", "match_width",
           "optimize_for_inference", "parameter_count", "predict_run", "tune_detection"]

# imported on first use: they bring Lightning and the inference stack (seconds), which `equiseg --help` and
# a user of the layers alone do not need
_LAZY = {"evaluate_run": "equiseg.evaluation.evaluate", "predict_run": "equiseg.inference.predict",
         "tune_detection": "equiseg.evaluation.tune_detect", "export_model": "equiseg.export",
         "fit": "equiseg.training.fit"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'equiseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
