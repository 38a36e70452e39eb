"""Built-in methods: importing a module registers it."""
from . import bitfit, lora, partial  # noqa: F401
from . import adapters  # noqa: F401
