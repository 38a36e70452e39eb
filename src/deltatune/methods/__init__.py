"""Built-in methods: importing a module registers it."""
from . import bitfit, lora, partial  # noqa: F401
from . import adapters  # noqa: F401
from . import diff_pruning, intrinsic  # noqa: F401
from . import ia3, ln_tuning  # noqa: F401
from . import loha, lokr  # noqa: F401
from . import oft, vera  # noqa: F401
from . import adalora  # noqa: F401
from . import p_tuning, p_tuning_v2, prefix, prompt_tuning  # noqa: F401
from . import mam  # noqa: F401  (after prefix and adapters, which it builds on)
