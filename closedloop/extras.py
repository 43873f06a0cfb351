"""Optional dependencies: what needs them, and the extra that installs each.

The core (the service, the demo, offline mode on XDF and NumPy recordings, MQTT) runs on
the base dependencies. Two heavy ones are extras, imported only by the commands that use
them: matplotlib (``closedloop[report]``: session reports, ``demo --report``,
``evaluate-phase --png``) and pyedflib (``closedloop[edf]``: EDF/BDF recordings). A
command checks for its extra before it starts work, so a missing one is a one-line
message naming the ``pip install`` to run, not a traceback after a minute of computing.
"""

from __future__ import annotations

import importlib

from closedloop.errors import MissingDependencyError

__all__ = ["require_edf", "require_matplotlib"]


def _require(module: str, *, extra: str, purpose: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module=module, extra=extra, purpose=purpose) from exc


def require_matplotlib(purpose: str = "figures") -> None:
    """Raise MissingDependencyError unless matplotlib can be imported."""
    _require("matplotlib", extra="report", purpose=purpose)


def require_edf() -> None:
    """Raise MissingDependencyError unless pyedflib can be imported."""
    _require("pyedflib", extra="edf", purpose="EDF/BDF recordings")
