"""A broker for ``closedloop demo --mqtt`` on a machine that may have none.

In order of preference: a broker already listening on 127.0.0.1:1883; a private
``mosquitto`` on a free port (when the program is installed); an embedded amqtt broker in
this process (``pip install 'closedloop[broker]'``; MQTT 3.1.1 only, so replies come on
``reply/<verb>`` instead of MQTT 5 response topics). The daemon itself always talks to a
real broker; this exists so the demo runs anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from closedloop.errors import ClosedLoopError

__all__ = ["LocalBroker", "local_broker"]


@dataclass(frozen=True, slots=True)
class LocalBroker:
    """Where the broker is and what it is."""

    host: str
    port: int
    protocol: str  # "5" or "3.1.1"
    kind: str  # "existing", "mosquitto", "amqtt"
    pid: int | None = None  # a mosquitto started here (amqtt runs in this process)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def local_broker(kinds: Sequence[str] = ("existing", "mosquitto", "amqtt")
                       ) -> AsyncIterator[LocalBroker]:
    """Yield a usable broker, started here when needed, and stop what was started.

    Args:
        kinds: The options to try, in order.

    Raises:
        ClosedLoopError: no broker is running and none can be started.
    """
    if "existing" in kinds and _listening(1883):
        yield LocalBroker("127.0.0.1", 1883, "5", "existing")
        return
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                        if Path("/usr/sbin/mosquitto").exists() else None)
    if "mosquitto" in kinds and exe is not None:
        port = _free_port()
        with tempfile.TemporaryDirectory() as tmp:
            conf = Path(tmp) / "mosquitto.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                            "persistence false\nset_tcp_nodelay true\n")
            proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                for _ in range(100):
                    if _listening(port):
                        break
                    await asyncio.sleep(0.05)
                yield LocalBroker("127.0.0.1", port, "5", "mosquitto", proc.pid)
            finally:
                proc.terminate()
                proc.wait(5)
        return
    try:
        if "amqtt" not in kinds:
            raise ImportError("amqtt not among the options")
        from amqtt.broker import Broker  # noqa: PLC0415
    except ImportError as exc:
        raise ClosedLoopError(
            "demo --mqtt needs an MQTT broker: none listens on 127.0.0.1:1883, mosquitto is "
            "not installed, and the embedded one is missing (pip install "
            "'closedloop[broker]')") from exc
    port = _free_port()
    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                    {"allow_anonymous": True}}}
    broker = Broker(config)
    await broker.start()
    try:
        yield LocalBroker("127.0.0.1", port, "3.1.1", "amqtt")
    finally:
        await broker.shutdown()
