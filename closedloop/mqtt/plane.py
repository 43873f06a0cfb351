"""The MQTT control plane of the service (aiomqtt, in a process of its own).

Topics, under ``mqtt.topic_prefix()`` (default ``closedloop/<instance>/``):

- ``cmd/<verb>`` (subscribed): commands, validated by :mod:`closedloop.mqtt.commands`.
  With MQTT 5 the subscription keeps the retain flag as published, so a command sent
  with the retain flag is refused even when it arrives live.
  Replies go to the MQTT 5 response topic with the correlation data when the command
  has them, otherwise to ``reply/<verb>``; each reply is ``{"ok": true, "verb", "id",
  "result"}`` or ``{"ok": false, "verb", "id", "error", "key"}``.
- ``status`` (retained): :meth:`~closedloop.control.api.ControlApi.status`, published on every state
  change and every ``status_interval_s``; the last will sets it to ``{"state":
  "offline"}``.
- ``events/pulse``, ``events/mep``, ``events/decision`` (at most ``decision_rate_hz``),
  ``events/fault`` (faults, stream changes, arm/disarm, protocol changes).
- ``metrics``: :meth:`~closedloop.control.api.ControlApi.metrics` every
  ``metrics_interval_s``, with the telemetry counters of this plane.

The real-time path never waits for the broker, nor shares its interpreter with MQTT: the
MQTT client, payload parsing and JSON run in a worker process
(:mod:`closedloop.mqtt.worker`, at a lower CPU priority), so they never hold the GIL the
EEG pipeline needs. This side, on the service's event loop, forwards events to it
without waiting (over a socket pair; beyond ``_MAX_BACKLOG`` bytes unsent, telemetry is
dropped and counted) and carries out what it asks: a command (validated, then applied in
one step), the status, the metrics. While the broker is down the worker drops and counts
telemetry (``telemetry_dropped``) and reconnects with jittered exponential backoff;
``on_disconnect = "disarm"`` disarms the stimulator the moment control is lost. If the
service dies, the worker exits without disconnecting, so the broker publishes the last
will; if the worker dies, the service fails visibly.

An unexpected exception while the service carries out a command (a bug, not a refusal:
refusals are ``ConfigError`` and ``ControlError``) disarms the stimulator, is recorded as
a ``fault`` event and answered ``ok: false``; the service keeps running, disarmed, and the
operator decides. A broker that is not on this machine, reached without TLS, is recorded
as ``mqtt_insecure`` at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
import subprocess
import sys
import time
from typing import Any

from closedloop.config.schema import Config, MqttConfig
from closedloop.control.api import ControlApi, Unsubscribe
from closedloop.errors import ConfigError, ControlError
from closedloop.mqtt.worker import FORWARDED, frame, insecure_connection, read_frame

__all__ = ["MqttControlPlane", "planes_for"]

_MAX_BACKLOG = 1 << 20  # bytes of telemetry waiting for the worker before dropping


def planes_for(cfg: Config) -> list[MqttControlPlane]:
    """The control planes a configuration asks for (the MQTT one when ``mqtt.enabled``),
    to hand to :meth:`ClosedLoopService.run <closedloop.control.service.ClosedLoopService.run>`."""
    return [MqttControlPlane(cfg.mqtt)] if cfg.mqtt.enabled else []


class MqttControlPlane:
    """Runs beside the service (a :class:`~closedloop.control.api.ControlApi`); the MQTT
    client in a worker process."""

    def __init__(self, cfg: MqttConfig) -> None:
        self._service: ControlApi | None = None
        self._unsubscribe: Unsubscribe | None = None
        self.cfg = cfg
        self.prefix = cfg.topic_prefix()
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._worker: dict[str, Any] = {}
        self.ipc_dropped = 0
        self._decision_tokens = 1.0
        self._decision_last = time.monotonic()

    @property
    def service(self) -> ControlApi:
        """The service this plane controls (once started)."""
        if self._service is None:
            raise RuntimeError("the MQTT control plane has not been started")
        return self._service

    # -- what the worker last reported -----------------------------------------------------
    @property
    def connected(self) -> bool:
        """Connected to the broker (as the worker last said; it says so within 0.25 s)."""
        return bool(self._worker.get("connected", False))

    @property
    def dropped(self) -> int:
        """Telemetry dropped: while disconnected, or queues full."""
        return int(self._worker.get("dropped", 0)) + self.ipc_dropped

    @property
    def pid(self) -> int | None:
        """The worker process's id, once started."""
        return self._proc.pid if self._proc is not None else None

    # -- life cycle ------------------------------------------------------------------------
    def bind(self, api: ControlApi) -> None:
        """Control ``api`` and subscribe to its events (:meth:`start` does it first)."""
        self._service = api
        self._unsubscribe = api.subscribe(self._on_event)

    async def start(self, api: ControlApi) -> None:
        """Subscribe to the service's events and start the worker process (on the
        service's event loop)."""
        self.bind(api)
        mine, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "closedloop.mqtt.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL)
        finally:
            theirs.close()
        warning = insecure_connection(self.cfg)
        if warning is not None:
            self.service.record("mqtt_insecure", host=self.cfg.host, message=warning)
        reader, self._writer = await asyncio.open_unix_connection(sock=mine)
        self._writer.write(frame(("init", self.cfg, os.getpid())))
        self._task = asyncio.create_task(self._from_worker(reader), name="mqtt-plane")

    async def stop(self, timeout: float = 5.0) -> None:
        """Unsubscribe; have the worker publish the final status and disconnect; wait."""
        self._stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError):
                self._writer.write(frame(("stop",)))
                await self._writer.drain()
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait, timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    def _send(self, *message: Any) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        if writer.transport.get_write_buffer_size() > _MAX_BACKLOG:
            return False
        writer.write(frame(message))
        return True

    # -- telemetry from the service (on the service's loop, never blocks) ------------------
    def _on_event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind not in FORWARDED:
            return
        if kind == "decision" and not self._decision_allowed():
            return
        try:
            sent = self._send("event", kind, fields)
        except (pickle.PicklingError, TypeError, AttributeError):  # telemetry never breaks
            sent = False  # the pulse path that recorded the event: count it and go on
        if not sent:
            self.ipc_dropped += 1

    def _decision_allowed(self) -> bool:
        rate = self.cfg.decision_rate_hz
        now = time.monotonic()
        self._decision_tokens = min(1.0, self._decision_tokens + (now - self._decision_last)
                                    * rate)
        self._decision_last = now
        if self._decision_tokens >= 1.0 and rate > 0:
            self._decision_tokens -= 1.0
            return True
        return False

    # -- requests from the worker ----------------------------------------------------------
    async def _from_worker(self, reader: asyncio.StreamReader) -> None:
        svc = self.service
        while True:
            try:
                message = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if self._stopping:
                    return
                code = self._proc.poll() if self._proc is not None else None
                svc.fail(ControlError(f"the MQTT control plane's process ended (exit code "
                                      f"{code}): {type(exc).__name__}"))
                return
            try:
                self._handle(message)
            except Exception as exc:  # a bug in the plane: the service must hear of it
                svc.fail(exc)
                return

    def _handle(self, message: tuple[Any, ...]) -> None:
        svc = self.service
        kind = message[0]
        if kind == "call":
            _, n, name, kwargs = message
            self._send("reply", n, self._serve(name, kwargs))
        elif kind == "record":
            svc.record(message[1], **message[2])
        elif kind == "disarm":
            svc.disarm(by=message[1])
        elif kind == "state":
            self._worker = message[1]

    def _serve(self, name: str, kwargs: dict[str, Any]) -> Any:
        svc = self.service
        plane = {"telemetry_dropped": self.ipc_dropped}
        if name == "status":
            return {**svc.status(), "mqtt": plane}
        if name == "metrics":
            return {**svc.metrics(), "mqtt": plane}
        return self.command(kwargs["verb"], kwargs["args"], kwargs["id"])

    def command(self, verb: str, args: dict[str, Any], cid: str | int | None
                ) -> dict[str, Any]:
        """Carry out a parsed command; the reply (its ``command`` event recorded)."""
        svc = self.service
        by = f"mqtt:{verb}"
        try:
            result: Any = None
            if verb == "arm":
                svc.arm(by=by)
            elif verb == "disarm":
                svc.disarm(by=by)
            elif verb == "start":
                svc.start_protocol(args["protocol"], pulses=args["pulses"], by=by)
            elif verb == "stop":
                svc.stop_protocol(by=by)
            elif verb == "set":
                result = svc.apply_settings(args, by=by)
            elif verb == "calibrate":
                result = svc.calibrate(seconds=args["seconds"], by=by)
            elif verb == "reload":
                result = svc.reload(by=by)
            else:
                result = svc.status()
            if result is None:
                result = {"state": svc.state}
            reply: dict[str, Any] = {"ok": True, "verb": verb, "id": cid, "result": result}
        except ConfigError as exc:
            reply = {"ok": False, "verb": verb, "id": cid, "error": str(exc), "key": exc.key}
        except ControlError as exc:
            reply = {"ok": False, "verb": verb, "id": cid, "error": str(exc), "key": ""}
        except Exception as exc:  # a bug while carrying it out: disarm, record, go on
            reply = {"ok": False, "verb": verb, "id": cid, "key": "", "error": (
                f"internal error while carrying out '{verb}' ({type(exc).__name__}: "
                f"{exc}); the stimulator was disarmed")}
            self._internal_error(verb, exc)
        svc.record("command", verb=verb, ok=reply["ok"], error=reply.get("error"))
        return reply

    def _internal_error(self, verb: str, exc: Exception) -> None:
        """Disarm after an unexpected exception in a command and record it as a fault; if
        even disarming fails, the service fails (disarmed by its fault path)."""
        svc = self.service
        try:
            svc.disarm(by="internal_error")
        except Exception as disarm_exc:
            svc.fail(disarm_exc)
        svc.record("fault", error=type(exc).__name__, message=str(exc)[:500],
                   during=f"mqtt:{verb}")
