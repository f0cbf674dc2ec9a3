"""An independent QUIC client (aioquic) speaking kefu/1: logs in on a bidirectional stream with
the J-IM binary framing, sends a private message to PEER, and waits for one back.

Usage: aioquic_kefu.py HOST PORT CA_PEM USER PEER
Prints READY after the login reply and GOT <content> when PEER's message arrives; exit code 0
only if both happened."""

import asyncio
import json
import struct
import sys

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration


def frame(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return bytes([0x01, 0x00, body["cmd"]]) + struct.pack(">i", len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, dict]:
    version, mask = await reader.readexactly(2)
    assert version == 0x01, version
    if mask & 0x20:
        await reader.readexactly(4)
    cmd = (await reader.readexactly(1))[0]
    (length,) = struct.unpack(">i", await reader.readexactly(4))
    return cmd, json.loads(await reader.readexactly(length))


async def main(host: str, port: int, ca: str, user: str, peer: str) -> int:
    config = QuicConfiguration(is_client=True, alpn_protocols=["kefu/1"], server_name="localhost")
    config.load_verify_locations(ca)
    async with connect(host, port, configuration=config) as client:
        reader, writer = await client.create_stream()
        writer.write(frame({"cmd": 5, "userId": user, "password": "pw"}))
        while True:
            cmd, body = await asyncio.wait_for(read_frame(reader), 10)
            if cmd == 6:
                if body.get("code") != 10007:
                    print("login failed", body, flush=True)
                    return 1
                break
        print("READY", flush=True)
        writer.write(frame({"cmd": 11, "chatType": 2, "to": peer, "content": "from aioquic"}))
        while True:
            cmd, body = await asyncio.wait_for(read_frame(reader), 10)
            if cmd == 12 and body.get("code") not in (10000, 10001):
                print("send failed", body, flush=True)
                return 1
            if cmd == 11 and body["data"]["from"] == peer:
                print("GOT", body["data"]["content"], flush=True)
                return 0


if __name__ == "__main__":
    host, port, ca, user, peer = sys.argv[1:6]
    sys.exit(asyncio.run(main(host, int(port), ca, user, peer)))
