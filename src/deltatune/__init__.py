"""deltatune: every way to adapt a frozen pretrained model, as a named delta.

Layers, each importing only those below it: core (layer, pieces, targets, files,
registry) <- methods (each registers itself here, on import) <- compose, ensembles
<- train, data, eval <- recipes, config_file, cli."""
from .core.config import DeltaConfig, PeftConvertible
from .core.errors import (ConfigError, CorruptFileError, DeltaError, IncompatibleDeltaError,
                          TargetNotFoundError, UnknownMethodError)
from .core.layer import DeltaLayer
from .core.model import DeltaModel, attach
from .core.pieces import AddsToOutput, ChangesInputs, ComputesOutput, DeltaPiece, ModelPiece
from .core.quantized import dequantize
from .core.registry import config_from_dict, method_names, register
from . import methods  # noqa: F401  (registers the built-in methods)
from .methods.bitfit import BitFitConfig
from .methods.lora import LoRAConfig
from .methods.lora_init import init_eva, save_as_plain_lora
from .methods.partial import FullConfig, PartialConfig
from .methods.adapters import AdapterConfig, FusionConfig
from .methods.mam import MAMConfig
from .methods.p_tuning import PTuningConfig
from .methods.p_tuning_v2 import MultiTaskPrompt, PTuningV2Config
from .methods.prefix import PrefixConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.diff_pruning import DiffPruningConfig
from .methods.intrinsic import IntrinsicConfig
from .methods.ia3 import IA3Config
from .methods.ln_tuning import LNTuningConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.oft import OFTConfig
from .methods.vera import VeRAConfig
from .methods.adalora import AdaLoRAConfig
from .compose import Average, Fuse, Stack
from .ensembles import EMA, Ensemble, Snapshots, average_deltas, copy_delta
from .arithmetic import combine, extract_lora, task_vector, to_lora
from . import data, train  # noqa: E402  (dt.data.sms_spam, dt.train.Trainer)

__version__ = "0.1.0"

__all__ = [
    "attach", "DeltaModel", "DeltaConfig", "config_from_dict", "register", "method_names",
    "DeltaLayer", "DeltaPiece", "AddsToOutput", "ComputesOutput", "ChangesInputs", "ModelPiece", "PeftConvertible",
    "LoRAConfig", "BitFitConfig", "PartialConfig", "FullConfig", "dequantize",
    "init_eva", "save_as_plain_lora",
    "AdapterConfig", "FusionConfig", "MAMConfig", "Stack", "Fuse", "Average", "average_deltas", "copy_delta", "EMA",
    "Snapshots", "Ensemble",
    "PromptTuningConfig", "PTuningConfig", "PrefixConfig", "PTuningV2Config", "MultiTaskPrompt",
    "DiffPruningConfig", "IntrinsicConfig",
    "IA3Config", "LNTuningConfig",
    "LoHaConfig", "LoKrConfig",
    "VeRAConfig", "OFTConfig",
    "AdaLoRAConfig",
    "DeltaError", "ConfigError", "CorruptFileError", "IncompatibleDeltaError", "TargetNotFoundError",
    "UnknownMethodError",
    "combine", "task_vector", "extract_lora", "to_lora",
]
