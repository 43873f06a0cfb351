"""The MQTT control plane of the service (aiomqtt).

Topics, under ``mqtt.topic_prefix()`` (default ``closedloop/<instance>/``):

- ``cmd/<verb>`` (subscribed): commands, validated by :mod:`closedloop.mqtt.commands`.
  With MQTT 5 the subscription keeps the retain flag as published, so a command sent
  with the retain flag is refused even when it arrives live.
  Replies go to the MQTT 5 response topic with the correlation data when the command
  has them, otherwise to ``reply/<verb>``; each reply is ``{"ok": true, "verb", "id",
  "result"}`` or ``{"ok": false, "verb", "id", "error", "key"}``.
- ``status`` (retained): :meth:`ClosedLoopService.status`, published on every state
  change and every ``status_interval_s``; the last will sets it to ``{"state":
  "offline"}``.
- ``events/pulse``, ``events/mep``, ``events/decision`` (at most ``decision_rate_hz``),
  ``events/fault`` (faults, stream changes, arm/disarm, protocol changes).
- ``metrics``: :meth:`ClosedLoopService.metrics` every ``metrics_interval_s``, with the
  telemetry counters of this plane.

The real-time path never waits for the broker, nor shares its event loop with MQTT: the
plane runs in its own thread with its own event loop (:meth:`MqttControlPlane.start`).
Payload parsing and config validation happen in that thread; only the final, cheap step
of a command (arm, swap in a validated config, build the status) runs on the service's
loop. Events go into a bounded queue that a publisher task drains; while disconnected or
when the queue is full, telemetry is dropped and counted (``telemetry_dropped``). A lost
broker is retried with jittered exponential backoff (as aiomqtt's own examples
recommend); ``on_disconnect = "disarm"`` disarms the stimulator the moment control is
lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from closedloop.config.schema import MqttConfig
from closedloop.control.runtime import apply_live_settings
from closedloop.control.service import ClosedLoopService
from closedloop.errors import ConfigError, ControlError
from closedloop.mqtt.commands import Command, CommandError, parse_command
from closedloop.recording.events import clean_json

__all__ = ["MqttControlPlane", "client_kwargs", "lower_thread_priority"]

_STATE_EVENTS = frozenset({"armed", "disarmed", "protocol_started", "protocol_stopped",
                           "stream_lost", "stream_recovered", "stream_connected",
                           "stream_error", "fault", "calibrated", "settings_changed"})
_FAULT_EVENTS = frozenset({"fault", "stream_lost", "stream_recovered", "stream_error",
                           "stream_missing", "samples_lost", "armed", "disarmed",
                           "protocol_started", "protocol_stopped", "control_lost",
                           "control_restored", "settings_changed", "calibrated"})


def client_kwargs(cfg: MqttConfig, *, identifier: str,
                  will: aiomqtt.Will | None = None) -> dict[str, Any]:
    """Keyword arguments for :class:`aiomqtt.Client` from the ``[mqtt]`` section."""
    tls = None
    if cfg.tls.ca is not None:
        tls = aiomqtt.TLSParameters(ca_certs=cfg.tls.ca, certfile=cfg.tls.cert,
                                    keyfile=cfg.tls.key)
    proto = aiomqtt.ProtocolVersion.V5 if cfg.protocol == "5" else aiomqtt.ProtocolVersion.V311
    # TCP_NODELAY: without it a QoS 1 publish waits ~40 ms for its PUBACK (Nagle's
    # algorithm against delayed ACKs); the broker should set it too (set_tcp_nodelay)
    return {"hostname": cfg.host, "port": cfg.port, "username": cfg.username,
            "password": cfg.password, "identifier": identifier, "protocol": proto,
            "keepalive": cfg.keepalive_s, "tls_params": tls, "will": will, "timeout": 5.0,
            "socket_options": [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]}


class MqttControlPlane:
    """Runs beside a :class:`ClosedLoopService`, in its own thread (:meth:`start`)."""

    def __init__(self, service: ClosedLoopService, cfg: MqttConfig,
                 *, wall_clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.cfg = cfg
        self.prefix = cfg.topic_prefix()
        self._now = wall_clock
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._queue_ready = asyncio.Event()
        self._status_changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the plane's own loop
        self._service_loop = asyncio.get_running_loop()
        self._main: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._signalled = False
        self._client: aiomqtt.Client | None = None
        self.connected = False
        self.dropped = 0
        self.published = 0
        self.commands = 0
        self.connections = 0
        self.last_error: str | None = None
        self.nice_error: str | None = None
        self._decision_tokens = 1.0
        self._decision_last = time.monotonic()
        service.add_listener(self._on_event)

    # -- thread life cycle ----------------------------------------------------------------
    def start(self) -> None:
        """Run the plane in its own thread (call from the service's event loop)."""
        started = threading.Event()

        def main() -> None:
            self.nice_error = lower_thread_priority(self.cfg.thread_nice)
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._main = loop.create_task(self.run(), name="mqtt-plane")
            started.set()
            try:
                loop.run_until_complete(self._main)
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # a bug in the plane: the service must hear of it
                self._post(self.service.fail, exc)
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="mqtt-plane", daemon=True)
        self._thread.start()
        started.wait(5.0)
        if self.nice_error is not None:
            self.service.record("mqtt_thread_priority_error", message=self.nice_error)

    @property
    def thread_id(self) -> int | None:
        """The plane thread's native (OS) id, once started."""
        return self._thread.native_id if self._thread is not None else None

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the final status, disconnect and end the thread (blocking)."""
        loop, task = self._loop, self._main
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may have ended already
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout)

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on the service's loop; nothing to do once the service has ended.

        The plane can outlive the service's loop by a moment at shutdown (its thread is
        joined with a timeout); a report then has no one to go to, and must not crash here.
        """
        loop = self._service_loop
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            if not loop.is_closed():
                raise

    async def _on_service(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the service's event loop and return its result here.

        Raises:
            asyncio.CancelledError: the service's loop has closed (the service has ended).
        """
        if self._service_loop.is_closed():
            raise asyncio.CancelledError

        async def call() -> Any:
            return fn(*args, **kwargs)
        coro = call()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._service_loop)
        except RuntimeError:
            coro.close()
            if self._service_loop.is_closed():
                raise asyncio.CancelledError from None
            raise
        return await asyncio.wrap_future(future)

    def _record(self, kind: str, **fields: Any) -> None:
        self._post(lambda: self.service.record(kind, **fields))

    def _wake(self, event: asyncio.Event) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    # -- telemetry from the service (called on the service's loop, never blocks) --------
    def _on_event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind in _STATE_EVENTS:
            self._wake(self._status_changed)
        if kind == "pulse":
            topic = "events/pulse"
        elif kind == "mep":
            topic = "events/mep"
        elif kind in ("protocol_started", "protocol_stopped", "protocol_result",
                      "protocol_error"):
            topic = "events/protocol"
        elif kind == "decision":
            if not self._decision_allowed():
                return
            topic = "events/decision"
        elif kind in _FAULT_EVENTS:
            topic = "events/fault"
        else:
            return
        if not self.connected or len(self._queue) >= self.cfg.telemetry_queue:
            self.dropped += 1
            return
        was_empty = not self._queue
        self._queue.append((topic, {"event": kind, **fields}))
        if was_empty:  # one wake-up per batch, not per event
            self._wake(self._queue_ready)

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

    # -- connection loop -----------------------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, reconnect with jittered exponential backoff; until cancelled."""
        attempt = 0
        offline = json.dumps({"state": "offline", "pid": os.getpid()})
        will = aiomqtt.Will(self.prefix + "status", offline, qos=1, retain=True)
        ident = f"closedloop-{self.cfg.instance}-{os.getpid()}"
        while True:
            try:
                async with aiomqtt.Client(**client_kwargs(self.cfg, identifier=ident,
                                                          will=will)) as client:
                    self._client = client
                    self.connected = True
                    self.connections += 1
                    if attempt:
                        self._record("control_restored", after_attempts=attempt)
                    attempt = 0
                    if self.cfg.protocol == "5":  # see the retain flag as published
                        await client.subscribe(self.prefix + "cmd/#", options=SubscribeOptions(
                            qos=1, retainAsPublished=True))
                    else:
                        await client.subscribe(self.prefix + "cmd/#", qos=1)
                    await self._publish_status()
                    try:
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._commands(client), name="mqtt-commands")
                            tg.create_task(self._publisher(client), name="mqtt-publisher")
                            tg.create_task(self._periodic(), name="mqtt-periodic")
                    except asyncio.CancelledError:  # a clean stop: say so in the status
                        stopped = {"state": "offline", "reason": "stopped", "pid": os.getpid()}
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(client.publish(
                                self.prefix + "status", _dumps(stopped), qos=1, retain=True), 2)
                        raise
            except* aiomqtt.MqttError as group:
                exc = group.exceptions[0]
                was_connected = self.connected
                self.connected = False
                self._client = None
                self._queue.clear()
                self.last_error = str(exc)
                attempt += 1
                if was_connected or attempt == 1:
                    self._record("control_lost", error=str(exc), attempt=attempt)
                    if self.cfg.on_disconnect == "disarm":
                        self._post(lambda: self.service.disarm(by="mqtt_disconnected"))
                delay = min(self.cfg.reconnect_max_s, 0.2 * 2 ** min(attempt, 10))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            await self._handle(client, message)

    async def _publisher(self, client: aiomqtt.Client) -> None:
        while True:
            await self._queue_ready.wait()
            self._queue_ready.clear()
            while self._queue:
                topic, payload = self._queue.popleft()
                await client.publish(self.prefix + topic, _dumps(payload), qos=0)
                self.published += 1
                await asyncio.sleep(0)  # let commands in between

    async def _periodic(self) -> None:
        next_metrics = time.monotonic() + self.cfg.metrics_interval_s
        next_status = time.monotonic() + self.cfg.status_interval_s
        while True:
            timeout = max(0.0, min(next_metrics, next_status) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_changed.wait(), timeout)
            now = time.monotonic()
            if self._status_changed.is_set() or now >= next_status:
                self._status_changed.clear()
                await self._publish_status()
                next_status = now + self.cfg.status_interval_s
            if now >= next_metrics:
                await self._publish(self.prefix + "metrics", await self.metrics())
                next_metrics = now + self.cfg.metrics_interval_s

    async def metrics(self) -> dict[str, Any]:
        """The service's metrics plus this plane's counters."""
        return {**await self._on_service(self.service.metrics),
                "mqtt": {"telemetry_dropped": self.dropped, "published": self.published,
                         "commands": self.commands, "connections": self.connections}}

    async def _publish_status(self) -> None:
        status = await self._on_service(self.service.status)
        status["mqtt"] = {"telemetry_dropped": self.dropped, "connections": self.connections}
        await self._publish(self.prefix + "status", status, qos=1, retain=True)

    async def _publish(self, topic: str, payload: dict[str, Any], *, qos: int = 0,
                       retain: bool = False, properties: Properties | None = None) -> None:
        client = self._client
        if client is None:
            self.dropped += 1
            return
        await client.publish(topic, _dumps(payload), qos=qos, retain=retain,
                             properties=properties)
        self.published += 1

    # -- commands ------------------------------------------------------------------------
    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        self.commands += 1
        topic = message.topic.value
        verb = topic[len(self.prefix) + len("cmd/"):]
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        raw = message.payload if isinstance(message.payload, bytes) else str(
            message.payload or "").encode()
        cid: str | int | None = None
        try:
            cmd = parse_command(verb, raw, now_s=self._now(), max_age_s=self.cfg.max_command_age_s,
                                max_bytes=self.cfg.max_payload_bytes, retained=message.retain)
        except CommandError as exc:
            reply: dict[str, Any] = {"ok": False, "verb": verb, "id": cid, "error": str(exc),
                                     "key": exc.key}
            self._record("command", verb=verb[:40], ok=False, error=reply["error"])
        else:
            reply = await self._execute(cmd)
        properties = None
        if self.cfg.protocol == "5" and correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        target = response_topic or f"{self.prefix}reply/{verb[:64] or 'unknown'}"
        await client.publish(target, _dumps(reply), qos=1, properties=properties)

    async def _execute(self, cmd: Command) -> dict[str, Any]:
        """Carry out a parsed command in one call on the service's loop; the reply.

        One hand-over per command (the action, its result and its ``command`` event
        together): each crossing wakes the loop that runs the pipeline.
        """
        svc = self.service
        by = f"mqtt:{cmd.verb}"
        base, new = svc.cfg, None
        if cmd.verb == "set":  # validated here, in this thread; the swap on the service's loop
            try:
                new = apply_live_settings(base, cmd.args, source=by)
            except ConfigError as exc:
                self._record("command", verb=cmd.verb, ok=False, error=str(exc))
                return {"ok": False, "verb": cmd.verb, "id": cmd.id, "error": str(exc),
                        "key": exc.key}

        def act() -> Any:
            if cmd.verb == "arm":
                svc.arm(by=by)
            elif cmd.verb == "disarm":
                svc.disarm(by=by)
            elif cmd.verb == "start":
                svc.start_protocol(cmd.args["protocol"], pulses=cmd.args["pulses"], by=by)
            elif cmd.verb == "stop":
                svc.stop_protocol(by=by)
            elif cmd.verb == "set":
                # another command changed the config meanwhile: validate against the new one
                cfg = new
                if cfg is None or svc.cfg is not base:
                    cfg = apply_live_settings(svc.cfg, cmd.args, source=by)
                svc.apply_config(cfg, by=by)
                return svc.settings()
            elif cmd.verb == "calibrate":
                return svc.calibrate(seconds=cmd.args["seconds"], by=by)
            elif cmd.verb == "reload":
                return svc.reload(by=by)
            else:
                return svc.status()
            return {"state": svc.state}

        def serve() -> dict[str, Any]:
            try:
                reply = {"ok": True, "verb": cmd.verb, "id": cmd.id, "result": act()}
            except ConfigError as exc:
                reply = {"ok": False, "verb": cmd.verb, "id": cmd.id, "error": str(exc),
                         "key": exc.key}
            except ControlError as exc:
                reply = {"ok": False, "verb": cmd.verb, "id": cmd.id, "error": str(exc),
                         "key": ""}
            svc.record("command", verb=cmd.verb, ok=reply["ok"], error=reply.get("error"))
            return reply

        return dict(await self._on_service(serve))


def lower_thread_priority(increment: int) -> str | None:
    """Raise the calling thread's nice value by ``increment`` (Linux: nice is per thread).

    Lowering one's own priority needs no privilege. The control plane does it so that when
    both cores are busy, the scheduler runs the EEG reader, the pipeline and the fire
    thread before command parsing and telemetry.

    Returns:
        None, or why it could not be done (the plane runs at normal priority then).
    """
    if increment <= 0:
        return None
    if not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return f"thread priority not lowered: per-thread nice needs Linux ({sys.platform})"
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError as exc:
        return f"thread priority not lowered: {exc}"
    return None


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(clean_json(payload), separators=(",", ":"))
