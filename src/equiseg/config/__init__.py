"""Run configuration: frozen dataclasses (`schema`), read from and written to YAML, with dotted overrides
(`serialize`).

A config file has the sections ``model``, ``data``, ``train``, ``detect`` and ``window``; any key may be
left out and takes its default. On the command line ``train.epochs=5`` or
``data.augment=heavy`` override single values (parsed as YAML scalars).
"""

from equiseg.config.schema import (
    ACCELERATORS,
    LOGGERS,
    PEAK_RULES,
    Compile,
    Config,
    DataConfig,
    DetectConfig,
    ModelConfig,
    Schedule,
    Selection,
    SyntheticConfig,
    TrainConfig,
    WindowConfig,
)
from equiseg.config.serialize import (
    ConfigError,
    apply_overrides,
    from_plain,
    json_text,
    path_override,
    plain,
    read_yaml,
)

__all__ = ["ACCELERATORS", "LOGGERS", "PEAK_RULES", "Compile", "Config", "ConfigError", "DataConfig", "DetectConfig",
           "ModelConfig", "Schedule", "Selection", "SyntheticConfig", "TrainConfig", "WindowConfig", "apply_overrides", "from_plain", "json_text",
           "path_override", "plain", "read_yaml"]
