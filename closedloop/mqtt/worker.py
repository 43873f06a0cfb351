"""The MQTT side of the control plane, in a process of its own (``python -m
closedloop.mqtt.worker FD``).

Why a process: paho's packet handling, JSON and payload checks are Python; in a thread of
the service they held the GIL the EEG pipeline waits for (measured: with 1000 commands
per minute, the share of decisions later than 1 ms went from 6% to 11-12%). Here they
run on their own interpreter, at a lower CPU priority (``mqtt.nice``).

The service (:mod:`closedloop.mqtt.plane`) and this process talk over a socket pair in
frames (4-byte length, then a pickle; both ends are this package):

- service -> worker: ``("init", MqttConfig, service_pid)`` first; then ``("event", kind,
  fields)`` for telemetry, ``("reply", n, value)`` for a call, ``("stop",)``;
- worker -> service: ``("call", n, name, kwargs)`` (``status``, ``metrics``,
  ``command``), ``("record", kind, fields)``, ``("disarm", by)``, ``("state", {"connected",
  "dropped"})`` (every 0.25 s and on connection changes).

When the service's end closes without ``stop`` (the service was killed), the worker exits
at once without disconnecting, so that the broker publishes the last will.

No message from the broker can end this process: each command is handled behind its own
exception barrier (:meth:`PlaneWorker._handle`); whatever goes wrong becomes an ``ok:
false`` reply and a recorded ``command`` event, and the next message is served. Only the
connection's own errors (``aiomqtt.MqttError``) leave it, to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import pickle
import random
import socket
import struct
import sys
import threading
import time
from collections import deque
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from closedloop.config.schema import MqttConfig
from closedloop.mqtt.commands import CommandError, parse_command
from closedloop.recording.events import clean_json

__all__ = ["HEADER", "PlaneWorker", "client_kwargs", "frame", "insecure_connection",
           "lower_thread_priority", "read_frame"]

HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024

_STATE_EVENTS = frozenset({"armed", "disarmed", "protocol_started", "protocol_stopped",
                           "stream_lost", "stream_recovered", "stream_connected",
                           "stream_error", "fault", "calibrated", "settings_changed"})
_FAULT_EVENTS = frozenset({"fault", "stream_lost", "stream_recovered", "stream_error",
                           "stream_missing", "samples_lost", "armed", "disarmed",
                           "protocol_started", "protocol_stopped", "control_lost",
                           "control_restored", "settings_changed", "calibrated"})
_PROTOCOL_EVENTS = frozenset({"protocol_started", "protocol_stopped", "protocol_result",
                              "protocol_error"})
FORWARDED = _STATE_EVENTS | _FAULT_EVENTS | _PROTOCOL_EVENTS | {"pulse", "mep", "decision"}


def frame(message: tuple[Any, ...]) -> bytes:
    """One message as bytes on the socket."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next message (raises ``asyncio.IncompleteReadError`` at the end)."""
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"control plane frame of {size} bytes")
    message = pickle.loads(await reader.readexactly(size))  # our own peer: trusted
    assert isinstance(message, tuple)
    return message


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


def insecure_connection(cfg: MqttConfig) -> str | None:
    """Why the broker connection is open to the network, or None.

    Commands that arm and fire a stimulator, and the credentials, travel in clear when the
    broker is not on this machine and TLS is off. A host name other than ``localhost`` is
    not resolved (that could block): it counts as remote.
    """
    if not cfg.enabled or cfg.tls.ca is not None:
        return None
    host = cfg.host.strip().rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    what = "commands" + (" and the password" if cfg.password is not None else "")
    return (f"mqtt.host {cfg.host!r} is not this machine and TLS is off (mqtt.tls.ca unset): "
            f"{what} travel in clear; anyone on the network can read them or send commands")


def lower_thread_priority(increment: int) -> str | None:
    """Raise the calling thread's nice value by ``increment`` (Linux: nice is per thread;
    threads started afterwards inherit it).

    Lowering one's own priority needs no privilege.

    Returns:
        None, or why it could not be done.
    """
    if increment <= 0:
        return None
    if not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return f"priority not lowered: per-thread nice needs Linux ({sys.platform})"
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError as exc:
        return f"priority not lowered: {exc}"
    return None


class PlaneWorker:
    """The MQTT client: commands in, replies, status, events and metrics out."""

    def __init__(self, cfg: MqttConfig, service_pid: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.cfg = cfg
        self.prefix = cfg.topic_prefix()
        self.service_pid = service_pid
        self._reader = reader
        self._writer = writer
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._queue_ready = asyncio.Event()
        self._status_changed = asyncio.Event()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._client: aiomqtt.Client | None = None
        self._stopping = asyncio.Event()
        self.connected = False
        self.dropped = 0
        self.published = 0
        self.commands = 0
        self.connections = 0

    # -- the service's end ---------------------------------------------------------------
    def _send(self, *message: Any) -> None:
        self._writer.write(frame(message))

    def _state(self) -> None:
        self._send("state", {"connected": self.connected, "dropped": self.dropped})

    async def _call(self, name: str, **kwargs: Any) -> Any:
        n = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[n] = future
        self._send("call", n, name, kwargs)
        try:
            return await future
        finally:
            self._calls.pop(n, None)

    async def _from_service(self) -> None:
        """Handle the service's messages; the end of the socket ends this process."""
        while True:
            try:
                message = await read_frame(self._reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                if self._stopping.is_set():
                    return
                os._exit(0)  # the service died: no DISCONNECT, so the broker sends the will
            kind = message[0]
            if kind == "event":
                self._on_event(message[1], message[2])
            elif kind == "reply":
                future = self._calls.get(message[1])
                if future is not None and not future.done():
                    future.set_result(message[2])
            elif kind == "stop":
                self._stopping.set()
                return

    def _on_event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind in _STATE_EVENTS:
            self._status_changed.set()
        if kind == "pulse":
            topic = "events/pulse"
        elif kind == "mep":
            topic = "events/mep"
        elif kind in _PROTOCOL_EVENTS:
            topic = "events/protocol"
        elif kind == "decision":
            topic = "events/decision"  # rate-limited by the service before sending
        elif kind in _FAULT_EVENTS:
            topic = "events/fault"
        else:
            return
        if not self.connected or len(self._queue) >= self.cfg.telemetry_queue:
            self.dropped += 1
            return
        self._queue.append((topic, {"event": kind, **fields}))
        self._queue_ready.set()

    # -- life ------------------------------------------------------------------------------
    async def main(self) -> None:
        """Serve until the service says stop (then publish "stopped" and disconnect)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._from_service())
            tg.create_task(self._states())
            mqtt = tg.create_task(self._connection_loop())
            await self._stopping.wait()
            mqtt.cancel()

    async def _states(self) -> None:
        while not self._stopping.is_set():
            self._state()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.25)

    async def _connection_loop(self) -> None:
        """Connect, serve, reconnect with jittered exponential backoff; until cancelled."""
        attempt = 0
        offline = json.dumps({"state": "offline", "pid": self.service_pid})
        will = aiomqtt.Will(self.prefix + "status", offline, qos=1, retain=True)
        ident = f"closedloop-{self.cfg.instance}-{self.service_pid}"
        while True:
            try:
                async with aiomqtt.Client(**client_kwargs(self.cfg, identifier=ident,
                                                          will=will)) as client:
                    self._client = client
                    if self.cfg.protocol == "5":  # see the retain flag as published
                        await client.subscribe(self.prefix + "cmd/#", options=SubscribeOptions(
                            qos=1, retainAsPublished=True))
                    else:
                        await client.subscribe(self.prefix + "cmd/#", qos=1)
                    # connected = commands are taken: only once the broker confirmed the
                    # subscription (a command sent before it would be lost)
                    self.connected = True
                    self.connections += 1
                    self._state()
                    if attempt:
                        self._send("record", "control_restored", {"after_attempts": attempt})
                    attempt = 0
                    await self._publish_status()
                    try:
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._commands(client), name="mqtt-commands")
                            tg.create_task(self._publisher(client), name="mqtt-publisher")
                            tg.create_task(self._periodic(), name="mqtt-periodic")
                    except asyncio.CancelledError:  # a clean stop: say so in the status
                        stopped = {"state": "offline", "reason": "stopped",
                                   "pid": self.service_pid}
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
                self._state()
                attempt += 1
                if was_connected or attempt == 1:
                    self._send("record", "control_lost", {"error": str(exc), "attempt": attempt})
                    if self.cfg.on_disconnect == "disarm":
                        self._send("disarm", "mqtt_disconnected")
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
                metrics = await self._call("metrics")
                metrics["mqtt"] = {**metrics.get("mqtt", {}), **self._counters()}
                metrics["mqtt"]["telemetry_dropped"] += self.dropped
                await self._publish(self.prefix + "metrics", metrics)
                next_metrics = now + self.cfg.metrics_interval_s

    def _counters(self) -> dict[str, int]:
        return {"published": self.published, "commands": self.commands,
                "connections": self.connections}

    async def _publish_status(self) -> None:
        status = await self._call("status")
        status["mqtt"]["telemetry_dropped"] += self.dropped
        status["mqtt"]["connections"] = self.connections
        await self._publish(self.prefix + "status", status, qos=1, retain=True)

    async def _publish(self, topic: str, payload: dict[str, Any], *, qos: int = 0,
                       retain: bool = False) -> None:
        client = self._client
        if client is None:
            self.dropped += 1
            return
        await client.publish(topic, _dumps(payload), qos=qos, retain=retain)
        self.published += 1

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """One command message: checked, carried out, answered; never an exception out.

        Behind this barrier, an exception (a bug: payload errors are CommandErrors) becomes
        an ``ok: false`` reply naming the internal error, and a recorded ``command`` event;
        the next message is served. Only the connection's errors leave, to reconnect.
        """
        self.commands += 1
        verb = message.topic.value[len(self.prefix) + len("cmd/"):]
        try:
            reply = await self._reply(verb, message)
        except Exception as exc:  # recorded and answered: the sender and the log hear of it
            reply = {"ok": False, "verb": verb[:64], "id": None, "key": "", "error": (
                f"internal error in the control plane while handling '{verb[:40]}' "
                f"({_describe(exc)}); see the event log")}
            self._send("record", "command", {"verb": verb[:40], "ok": False,
                                             "error": reply["error"]})
        try:
            await self._answer(client, message, verb, reply)
        except aiomqtt.MqttError:
            raise  # the connection: _connection_loop reconnects
        except Exception as exc:  # the reply is lost: say so in the event log
            self._send("record", "command_reply_error", {"verb": verb[:40],
                                                         "error": _describe(exc)})

    async def _reply(self, verb: str, message: aiomqtt.Message) -> dict[str, Any]:
        """The reply to one command (its ``command`` event recorded)."""
        payload = message.payload
        raw = bytes(payload) if isinstance(payload, bytes | bytearray) else str(
            payload or "").encode()
        try:
            cmd = parse_command(verb, raw, now_s=time.time(),
                                max_age_s=self.cfg.max_command_age_s,
                                max_bytes=self.cfg.max_payload_bytes, retained=message.retain)
        except CommandError as exc:
            self._send("record", "command", {"verb": verb[:40], "ok": False, "error": str(exc)})
            return {"ok": False, "verb": verb[:64], "id": None, "error": str(exc),
                    "key": exc.key}
        # carried out on the service's loop, which records the command
        reply: dict[str, Any] = await self._call("command", verb=cmd.verb, args=cmd.args,
                                                 id=cmd.id)
        return reply

    async def _answer(self, client: aiomqtt.Client, message: aiomqtt.Message, verb: str,
                      reply: dict[str, Any]) -> None:
        """Publish the reply: to the MQTT 5 response topic if any, else ``reply/<verb>``.

        A response topic that cannot be published to (paho refuses wildcards, for one) gets
        the reply on ``reply/<verb>`` instead, with the reason recorded.
        """
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        properties = None
        if self.cfg.protocol == "5" and correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        fallback = f"{self.prefix}reply/{verb[:64] or 'unknown'}"
        body = _dumps(reply)
        try:
            await client.publish(response_topic or fallback, body, qos=1,
                                 properties=properties)
        except ValueError as exc:  # paho refuses the topic before sending anything
            if response_topic is None:
                raise
            self._send("record", "command_reply_error", {
                "verb": verb[:40], "topic": str(response_topic)[:80],
                "error": f"{_describe(exc)}; replied on {fallback} instead"})
            await client.publish(fallback, body, qos=1, properties=properties)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def _dumps(payload: dict[str, Any]) -> str:
    """JSON text of a reply or telemetry message; a value that cannot be encoded (only a
    cyclic structure is left, :func:`clean_json` makes the rest representable) is named."""
    try:
        return json.dumps(clean_json(payload), separators=(",", ":"))
    except (ValueError, TypeError, RecursionError) as exc:
        problem = f"unencodable: {_describe(exc)}"
        return json.dumps({"ok": False, "error": problem} if "ok" in payload else
                          {"event": str(payload.get("event")), "error": problem})


async def _main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    message = await read_frame(reader)
    assert message[0] == "init"
    cfg, service_pid = message[1], message[2]
    worker = PlaneWorker(cfg, service_pid, reader, writer)
    error = lower_thread_priority(cfg.nice)
    if error is not None:
        worker._send("record", "mqtt_priority_error", {"message": error})
    await worker.main()
    worker._state()
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


def run(argv: list[str]) -> None:
    """Entry point: ``python -m closedloop.mqtt.worker FD``."""
    asyncio.run(_main(int(argv[0])))


if __name__ == "__main__":
    run(sys.argv[1:])
