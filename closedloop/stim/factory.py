"""Build the driver that ``[stimulator] driver`` names."""

from __future__ import annotations

from closedloop.config.schema import StimulatorConfig
from closedloop.stim.base import Stimulator
from closedloop.stim.magstim import MagstimStimulator
from closedloop.stim.magventure import MagVentureStimulator
from closedloop.stim.simulated import SimulatedStimulator
from closedloop.stim.ttl import TtlLine, TtlStimulator

__all__ = ["DRIVER_NAMES", "make_driver"]

DRIVER_NAMES = ("simulated", "ttl", "magstim-200", "magstim-bistim", "magstim-rapid",
                "magventure")


def make_driver(cfg: StimulatorConfig) -> Stimulator:
    """A closed (not yet opened) driver for ``cfg``."""
    latency = None if cfg.latency_ms is None else cfg.latency_ms / 1000.0
    width = cfg.ttl_pulse_width_ms / 1000.0
    if cfg.driver == "simulated":
        return SimulatedStimulator(coil_stream=cfg.coil_stream, latency_s=latency or 0.0)
    if cfg.driver == "ttl":
        return TtlStimulator(port=cfg.port, line=cfg.ttl_line,
                             pulse_width_ms=cfg.ttl_pulse_width_ms, code=cfg.ttl_code,
                             latency_s=latency)
    trigger = (TtlLine(cfg.trigger_port, line=cfg.ttl_line, width_s=width, code=cfg.ttl_code)
               if cfg.trigger_port else None)
    timeout = cfg.reply_timeout_ms / 1000.0
    if cfg.driver == "magventure":
        return MagVentureStimulator(port=cfg.port, timeout_s=timeout,
                                    poll_s=cfg.poll_ms / 1000.0, trigger=trigger,
                                    latency_s=latency)
    model = cfg.driver.removeprefix("magstim-")
    assert model in ("200", "bistim", "rapid")
    return MagstimStimulator(port=cfg.port, model=model,  # type: ignore[arg-type]
                             keepalive_s=cfg.keepalive_ms / 1000.0, timeout_s=timeout,
                             unlock_code=cfg.unlock_code, trigger=trigger, latency_s=latency)
