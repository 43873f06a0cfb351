"""Helpers for MQTT tests: private Mosquitto brokers, raw commands, a service in a thread."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from closedloop.config.schema import Config
from closedloop.control.service import ClosedLoopService, ServiceStats
from closedloop.mqtt.plane import MqttControlPlane, planes_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certificates(tmp: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1; returns the CA file."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=closedloop-test-ca")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return tmp / "ca.crt"


class Broker:
    """A private Mosquitto on its own port, restartable, optionally with passwords."""

    def __init__(self, tmp: Path, *, users: dict[str, str] | None = None,
                 tls: bool = False) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.skip("mosquitto is not installed (.ci/run installs it)")
        self.exe = exe
        self.port = free_port()
        conf = [f"listener {self.port} 127.0.0.1", "persistence false", "set_tcp_nodelay true"]
        if os.geteuid() == 0:  # mosquitto would drop to its own user, who cannot read tmp_path
            conf.append("user root")
        if users:
            pw = tmp / "passwd"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True,
                               capture_output=True)
            conf += ["allow_anonymous false", f"password_file {pw}"]
        else:
            conf += ["allow_anonymous true"]
        self.ca: Path | None = None
        if tls:
            self.ca = make_certificates(tmp)
            conf += [f"cafile {tmp / 'ca.crt'}", f"certfile {tmp / 'server.crt'}",
                     f"keyfile {tmp / 'server.key'}"]
        self.conf = tmp / f"mosquitto-{self.port}.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


async def raw_command(prefix: str, verb: str, payload: bytes, *, port: int = 1883,
                      retain: bool = False, timeout: float = 20.0) -> dict[str, Any]:
    """Publish exactly ``payload`` to ``cmd/<verb>``; return the reply (MQTT 5 response)."""
    token = uuid.uuid4().hex
    reply_topic = f"{prefix}reply/test-{token}"
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"t-{token[:10]}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(reply_topic, qos=1)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = token.encode()
        await client.publish(f"{prefix}cmd/{verb}", payload, qos=1, retain=retain,
                             properties=props)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                assert message.properties is not None
                assert message.properties.CorrelationData == token.encode()
                result: dict[str, Any] = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                if retain:  # do not leave a retained command behind
                    await client.publish(f"{prefix}cmd/{verb}", b"", qos=1, retain=True)
                return result
    raise AssertionError("unreachable")


def command(prefix: str, verb: str, port: int = 1883, **fields: Any) -> dict[str, Any]:
    """A well-formed command with a fresh ts, synchronously."""
    body = json.dumps({"ts": time.time(), **fields}).encode()
    return asyncio.run(raw_command(prefix, verb, body, port=port))


async def retained(topic: str, port: int = 1883, timeout: float = 3.0) -> dict[str, Any] | None:
    """The retained message on ``topic`` (None if there is none)."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"r-{uuid.uuid4().hex[:10]}") as c:
        await c.subscribe(topic)
        try:
            async with asyncio.timeout(timeout):
                async for message in c.messages:
                    if message.retain:
                        return dict(json.loads(bytes(message.payload)))  # type: ignore[arg-type]
        except TimeoutError:
            return None
    return None


class ThreadedService:
    """A service running in its own thread and event loop, for synchronous tests."""

    def __init__(self, cfg: Config, *, config_source: str = "") -> None:
        self.service = ClosedLoopService(cfg, config_source=config_source)
        self.planes = planes_for(cfg)
        self.loop = asyncio.new_event_loop()
        self.stats: ServiceStats | None = None
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)
        ready = asyncio.run_coroutine_threadsafe(self.service.ready.wait(), self.loop)
        ready.result(20)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self._started.set()
            try:
                self.stats = await self.service.run(self._stop, attachments=self.planes)
            except BaseException as exc:  # reported to the test through .error
                self.error = exc

        try:
            self.loop.run_until_complete(main())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    @property
    def plane(self) -> MqttControlPlane:
        """The MQTT control plane attached to the service."""
        return self.planes[0]

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args)`` on the service's loop and return its result."""
        async def wrapper() -> Any:
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(5)

    def stop(self) -> ServiceStats | None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        return self.stats


async def raw_commands(prefix: str, items: list[tuple[str, bytes]], *, port: int = 1883,
                       timeout: float = 10.0) -> list[dict[str, Any]]:
    """Publish each ``(verb, payload)`` over one connection; the replies, in that order."""
    token = uuid.uuid4().hex
    reply_topic = f"{prefix}reply/test-{token}"
    replies: dict[bytes, dict[str, Any]] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"b-{token[:10]}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(reply_topic, qos=1)
        for n, (verb, payload) in enumerate(items):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = str(n).encode()
            await client.publish(f"{prefix}cmd/{verb}", payload, qos=1, properties=props)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                assert message.properties is not None
                replies[message.properties.CorrelationData] = json.loads(
                    bytes(message.payload))  # type: ignore[arg-type]
                if len(replies) == len(items):
                    break
    return [replies[str(n).encode()] for n in range(len(items))]
