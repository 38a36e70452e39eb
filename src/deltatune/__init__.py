"""deltatune: every way to adapt a frozen pretrained model, as a named delta."""
from .core.config import DeltaConfig, config_from_dict
from .core.errors import (ConfigError, CorruptFileError, DeltaError, IncompatibleDeltaError,
                          TargetNotFoundError, UnknownMethodError)
from .core.layer import DeltaLayer, DeltaPiece
from .core.model import DeltaModel, ModelPiece, attach
from .core.registry import method_names, register
from .methods.bitfit import BitFitConfig
from .methods.lora import LoRAConfig
from .methods.partial import FullConfig, PartialConfig
from .methods.adapters import AdapterConfig, FusionConfig
from .methods.mam import MAMConfig
from .methods.p_tuning import PTuningConfig
from .methods.p_tuning_v2 import MultiTaskPrompt, PTuningV2Config
from .methods.prefix import PrefixConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.diff_pruning import DiffPruningConfig
from .methods.intrinsic import IntrinsicConfig
from .compose import (EMA, Average, Ensemble, Fuse, Snapshots, Stack, average_deltas,  # noqa: E402
                      copy_delta)
from . import data, train  # noqa: E402  (dt.data.sms_spam, dt.train.Trainer)

__version__ = "0.1.0"

__all__ = [
    "attach", "DeltaModel", "DeltaConfig", "config_from_dict", "register", "method_names",
    "DeltaLayer", "DeltaPiece", "ModelPiece",
    "LoRAConfig", "BitFitConfig", "PartialConfig", "FullConfig",
    "AdapterConfig", "FusionConfig", "MAMConfig", "Stack", "Fuse", "Average", "average_deltas", "copy_delta", "EMA",
    "Snapshots", "Ensemble",
    "PromptTuningConfig", "PTuningConfig", "PrefixConfig", "PTuningV2Config", "MultiTaskPrompt",
    "DiffPruningConfig", "IntrinsicConfig",
    "DeltaError", "ConfigError", "CorruptFileError", "IncompatibleDeltaError", "TargetNotFoundError",
    "UnknownMethodError",
]
