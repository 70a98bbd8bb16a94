"""memsafe: train diffusion models that do not memorize what they must not."""

from memsafe.errors import MemsafeError

__version__ = "0.1.0"
__all__ = ["MemsafeError", "__version__"]
