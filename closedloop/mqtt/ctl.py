"""``closedloop ctl``: send one command and print the reply, or watch the telemetry."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from closedloop.config.schema import MqttConfig
from closedloop.errors import ControlError
from closedloop.mqtt.worker import client_kwargs

__all__ = ["send_command", "watch"]


async def send_command(cfg: MqttConfig, verb: str, args: dict[str, Any], *,
                       timeout_s: float = 5.0) -> dict[str, Any]:
    """Publish ``<prefix>cmd/<verb>`` and wait for its reply.

    Raises:
        ControlError: no reply within ``timeout_s``.
        aiomqtt.MqttError: the broker could not be reached or refused us.
    """
    prefix = cfg.topic_prefix()
    token = uuid.uuid4().hex
    payload = {"ts": time.time(), "id": token, **args}
    v5 = cfg.protocol == "5"
    reply_topic = f"{prefix}reply/ctl-{token}" if v5 else f"{prefix}reply/{verb}"
    async with aiomqtt.Client(**client_kwargs(cfg, identifier=f"closedloop-ctl-{token[:8]}")
                              ) as client:
        await client.subscribe(reply_topic, qos=1)
        props = None
        if v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = reply_topic
            props.CorrelationData = token.encode()
        await client.publish(f"{prefix}cmd/{verb}", json.dumps(payload), qos=1,
                             properties=props)
        try:
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    reply = json.loads(bytes(message.payload))
                    if reply.get("id") == token or (v5 and reply.get("id") is None):
                        return dict(reply)
        except TimeoutError:
            pass
    raise ControlError(f"no reply to '{verb}' within {timeout_s:g} s on {cfg.host}:{cfg.port} "
                       f"(is a service running with mqtt.enabled = true and mqtt.instance = "
                       f"'{cfg.instance}'?)")


async def watch(cfg: MqttConfig, *, out: Callable[[str], None] = print,
                count: int | None = None) -> None:
    """Print status, events and metrics as ``topic payload`` lines (until ``count``)."""
    prefix = cfg.topic_prefix()
    seen = 0
    async with aiomqtt.Client(**client_kwargs(
            cfg, identifier=f"closedloop-watch-{uuid.uuid4().hex[:8]}")) as client:
        for sub in ("status", "events/#", "metrics", "reply/#"):
            await client.subscribe(prefix + sub, qos=0)
        async for message in client.messages:
            text = bytes(message.payload).decode("utf-8", "replace")
            out(f"{message.topic.value} {text}")
            seen += 1
            if count is not None and seen >= count:
                return
