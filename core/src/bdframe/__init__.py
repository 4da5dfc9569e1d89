"""bdframe: train clean models on possibly poisoned data.

The core is deliberately small: component interfaces (:mod:`bdframe.interfaces`), the pluggy
hook specifications and registry (:mod:`bdframe.hookspecs`, :mod:`bdframe.plugins`,
:mod:`bdframe.registry`), recipes (:mod:`bdframe.recipe`), the in-memory data pipeline
(:mod:`bdframe.data`), metrics, run directories and the CLI. Heavy imports (torch) happen in
the modules that need them, so ``import bdframe`` stays cheap.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bdframe")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

from bdframe.errors import UserError  # noqa: E402
from bdframe.hookspecs import hookimpl  # noqa: E402

__all__ = ["UserError", "hookimpl", "__version__"]
