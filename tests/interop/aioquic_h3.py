"""An independent HTTP/3 client (aioquic) calling the node's /v1 API over h3.

Usage: aioquic_h3.py HOST PORT CA_PEM
Sends a message with POST /v1/messages, reads it back with GET
/v1/conversations/p:h3a:h3b/messages, and prints OK when both answered as expected."""

import asyncio
import json
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._events = {}
        self._waiters = {}

    def quic_event_received(self, event):
        for ev in self._http.handle_event(event):
            if isinstance(ev, (HeadersReceived, DataReceived)):
                self._events.setdefault(ev.stream_id, []).append(ev)
                if ev.stream_ended and ev.stream_id in self._waiters:
                    self._waiters.pop(ev.stream_id).set_result(self._events.pop(ev.stream_id))

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        stream_id = self._quic.get_next_available_stream_id()
        headers = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", path.encode())]
        if body:
            headers.append((b"content-type", b"application/json"))
        self._http.send_headers(stream_id=stream_id, headers=headers, end_stream=not body)
        if body:
            self._http.send_data(stream_id=stream_id, data=body, end_stream=True)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[stream_id] = waiter
        self.transmit()
        events = await asyncio.wait_for(waiter, 10)
        status = int(dict(events[0].headers)[b":status"])
        return status, b"".join(e.data for e in events if isinstance(e, DataReceived))


async def main(host: str, port: int, ca: str) -> int:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.load_verify_locations(ca)
    async with connect(host, port, configuration=config, create_protocol=H3Client) as client:
        body = json.dumps({"from": "h3a", "to": "h3b", "content": "over http/3"}).encode()
        status, data = await client.request("POST", "/v1/messages", body)
        reply = json.loads(data)
        if status != 200 or reply.get("code") not in (10000, 10001):
            print("send failed", status, data, flush=True)
            return 1
        status, data = await client.request("GET", "/v1/conversations/p:h3a:h3b/messages")
        messages = json.loads(data)["messages"]
        if status != 200 or [m["content"] for m in messages] != ["over http/3"]:
            print("history failed", status, data, flush=True)
            return 1
        print("OK", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
