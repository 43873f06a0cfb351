"""The operator's commands: the :class:`~closedloop.control.api.ControlApi` of a running
service (arm, disarm, protocols, live settings, calibrate, reload, status, metrics).

Control planes (MQTT, SIGHUP, tests) hold a :class:`ServiceControl`, never the service.
Every method runs on the event loop; a refusal is a :class:`~closedloop.errors.
ControlError` or a :class:`~closedloop.errors.ConfigError` naming the key, and nothing has
changed then.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from closedloop.config.load import load_config
from closedloop.config.schema import Config
from closedloop.control.api import Listener, Unsubscribe
from closedloop.control.protocols import PROTOCOLS, ProtocolRun, ProtocolRunner
from closedloop.control.rig import Rig
from closedloop.control.runtime import (
    LIVE_KEYS,
    apply_live_settings,
    live_value,
    restart_keys,
)
from closedloop.control.stats import ServiceStats
from closedloop.control.status import metrics, status
from closedloop.errors import ControlError, StimulatorError

__all__ = ["ServiceControl", "Session"]


class Session(Protocol):
    """The running service, as its commands see it."""

    cfg: Config
    config_source: str
    config_overrides: tuple[str, ...]
    stats: ServiceStats

    @property
    def state(self) -> str: ...

    @property
    def fault(self) -> BaseException | None: ...

    @property
    def rig(self) -> Rig | None: ...

    @property
    def protocols(self) -> ProtocolRunner | None: ...

    def record(self, kind: str, **fields: Any) -> None: ...

    def subscribe(self, fn: Listener) -> Unsubscribe: ...

    def fail(self, exc: BaseException) -> None: ...

    def status_fields(self) -> dict[str, Any]:
        """The service's own part of the status (uptime, version, units fired...)."""
        ...


class ServiceControl:
    """What the operator may ask of the running service."""

    def __init__(self, session: Session) -> None:
        self._s = session

    @property
    def state(self) -> str:
        """``starting``, ``idle``, ``armed``, ``running`` (a protocol), ``fault``, ``stopped``."""
        return self._s.state

    def record(self, kind: str, **fields: Any) -> None:
        """Record an event in the log (and hand it to the listeners)."""
        self._s.record(kind, **fields)

    def subscribe(self, fn: Listener) -> Unsubscribe:
        """Call ``fn(kind, fields)`` for every recorded event (on the event loop) until the
        returned function is called."""
        return self._s.subscribe(fn)

    def fail(self, exc: BaseException) -> None:
        """A fault that stops the service: disarm at once, record, stop."""
        self._s.fail(exc)

    def _operational(self, verb: str) -> Rig:
        state, rig = self._s.state, self._s.rig
        if state in ("fault", "stopped", "starting") or rig is None:
            fault = self._s.fault
            raise ControlError(f"{verb}: refused, the service is {state}"
                               + (f" ({fault})" if fault else ""))
        if rig.eeg.lost:
            raise ControlError(f"{verb}: refused, the EEG stream is lost")
        return rig

    # -- arming ---------------------------------------------------------------------------
    def arm(self, *, by: str) -> None:
        """Arm the stimulator (pulses that pass the gate will fire).

        Raises:
            ControlError: faulted, stopping, not ready, or the EEG stream is lost.
        """
        rig = self._operational("arm")
        try:
            rig.stim.arm()
        except StimulatorError as exc:
            raise ControlError(f"arm: refused, {exc}") from exc
        self._s.record("armed", by=by)

    def disarm(self, *, by: str) -> None:
        """Disarm and cancel any pending pulse; always allowed."""
        rig = self._s.rig
        if rig is not None:
            rig.stim.disarm()
            rig.scheduler.cancel("disarmed")
        self._s.record("disarmed", by=by)

    # -- protocols ------------------------------------------------------------------------
    @property
    def protocol(self) -> ProtocolRun | None:
        """The running protocol's state (None: none runs)."""
        runner = self._s.protocols
        return runner.run if runner is not None else None

    def start_protocol(self, name: str, *, pulses: int | None, by: str) -> None:
        """Arm and run a protocol until stopped or ``pulses`` have fired
        (:mod:`closedloop.control.protocols`).

        Raises:
            ControlError: unknown protocol, one already running, not operational, or one
                the stimulation pattern or the streams cannot run.
        """
        if name not in PROTOCOLS:
            raise ControlError(f"protocol: unknown '{name}' (known: {', '.join(PROTOCOLS)})")
        running = self.protocol
        if running is not None:
            raise ControlError(f"start: protocol '{running.name}' is running; stop it first")
        rig = self._operational("start")
        runner, cfg = self._s.protocols, self._s.cfg
        assert runner is not None
        runner.start(name, pulses=pulses, by=by, emg_connected=rig.emg is not None,
                     intensity_pct=cfg.stimulator.intensity_pct,
                     max_intensity_pct=cfg.safety.max_intensity_pct, seed=cfg.trigger.seed)

    def stop_protocol(self, *, by: str) -> None:
        """Stop the running protocol (if any) and disarm."""
        runner = self._s.protocols
        if runner is None:
            self.disarm(by=by)
        else:
            runner.stop(by=by)

    # -- settings -------------------------------------------------------------------------
    def apply_settings(self, changes: dict[str, Any], *, by: str) -> dict[str, Any]:
        """Change live settings (see :data:`~closedloop.control.runtime.LIVE_KEYS`).

        Raises:
            ConfigError: naming the bad key; nothing is changed then.
        """
        self.apply_config(apply_live_settings(self._s.cfg, changes, source=by), by=by)
        return self.settings()

    def apply_config(self, new: Config, *, by: str) -> None:
        """Swap in an already validated config that differs only in live settings."""
        old, rig = self._s.cfg, self._s.rig
        # everything that can be refused is checked before anything changes; the device
        # is the one step that can still fail, and then nothing else has changed
        band_changes = rig is not None and new.phase.band_hz != old.phase.band_hz
        if band_changes and new.phase.band_hz == "auto":
            raise ControlError("band_hz: use the calibrate command to find the band")
        if rig is not None and new.stimulator.intensity_pct != old.stimulator.intensity_pct:
            try:
                rig.stim.set_intensity(new.stimulator.intensity_pct)
            except StimulatorError as exc:
                raise ControlError(f"intensity_pct: {exc}") from exc
        if band_changes:
            assert rig is not None and new.phase.band_hz != "auto"
            with rig.tracker_lock:  # (the pipeline steps it in the acquisition thread)
                rig.tracker.set_band(new.phase.band_hz)
        self._s.cfg = new
        changed = {k: live_value(new, d) for k, d in LIVE_KEYS.items()
                   if live_value(new, d) != live_value(old, d)}
        self._s.record("settings_changed", by=by, changes=changed)

    def settings(self) -> dict[str, Any]:
        """The live settings now."""
        out = {}
        for short, dotted in LIVE_KEYS.items():
            value = live_value(self._s.cfg, dotted)
            out[short] = list(value) if isinstance(value, tuple) else value
        rig = self._s.rig
        if rig is not None and rig.tracker.band is not None:
            out["band_hz"] = list(rig.tracker.band)
        return out

    def calibrate(self, *, seconds: float, by: str) -> dict[str, Any]:
        """Find the individual peak in the newest ``seconds`` of EEG and use its band.

        Raises:
            ControlError: not enough data, or not operational.
        """
        rig = self._operational("calibrate")
        try:
            with rig.tracker_lock:  # (the pipeline steps it in the acquisition thread)
                peak = rig.tracker.calibrate(seconds)
        except ValueError as exc:
            raise ControlError(f"calibrate: {exc}") from exc
        result = {"peak_hz": peak.peak_hz, "snr_db": round(peak.snr_db, 2),
                  "band_hz": list(peak.band_hz), "seconds": seconds}
        self._s.stats.calibration = result
        self._s.record("calibrated", by=by, **result)
        return result

    def reload(self, *, by: str) -> dict[str, Any]:
        """Re-read the config file; apply it if only live-settable keys changed.

        Raises:
            ConfigError: the file is invalid (the running config is kept).
            ControlError: keys that need a restart changed (nothing is applied).

        Every refusal (SIGHUP or MQTT alike) is recorded as ``reload_refused`` with the
        reason and ``by`` before it is raised.
        """
        s = self._s
        try:
            if not s.config_source or not os.path.exists(s.config_source):
                raise ControlError("reload: the service was not started from a config file")
            new = load_config(s.config_source, s.config_overrides)
            blocked = restart_keys(s.cfg, new)
            if blocked:
                raise ControlError("reload: these keys need a restart: " + ", ".join(blocked))
            self.apply_config(new, by=by)
        except Exception as exc:  # recorded here, raised to the caller
            s.record("reload_refused", by=by, error=str(exc) or type(exc).__name__)
            raise
        return self.settings()

    # -- what it says ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """State, stream health, counts, settings: what `status` replies and publishes."""
        s = self._s
        fault = s.fault
        return status(s.rig, s.stats, state=s.state, settings=self.settings(),
                      protocol=self.protocol.summary() if self.protocol else None,
                      fault=str(fault) if fault else None, **s.status_fields())

    def metrics(self) -> dict[str, Any]:
        """Latency percentiles, phase accuracy proxy, buffer fill, dropped samples."""
        return metrics(self._s.rig, self._s.stats)
