"""closedloop: brain-state-dependent TMS over Lab Streaming Layer."""

__version__ = "0.1.0"

__all__ = ["__version__"]
