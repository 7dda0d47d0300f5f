"""A minimal authoritative DNS server over UDP on loopback, for testing `dns:` stage targets with real name
resolution (gRPC's c-ares resolver sends it real queries).

It answers A queries for the names it knows with every address of the name (so gRPC's round_robin sees
several backends), AAAA and every other type with an empty NOERROR answer, and unknown names with NXDOMAIN.
gRPC reaches it through the target's authority: `dns://127.0.0.1:<port>/<name>:<service port>`.

The wire format is RFC 1035's: a 12-byte header, the question (length-prefixed labels, type, class), then
the answers, each pointing back at the question's name (0xC00C).
"""

from __future__ import annotations

import socket
import struct
import threading

TYPE_A = 1
CLASS_IN = 1
FLAG_RESPONSE, FLAG_AUTHORITATIVE, FLAG_RECURSION_DESIRED = 0x8000, 0x0400, 0x0100
RCODE_NXDOMAIN = 3


def _parse_question(packet: bytes) -> tuple[str, int, int, int]:
    """(name, type, class, end offset of the question) of the first question."""
    labels, offset = [], 12
    while packet[offset]:
        length = packet[offset]
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii").lower())
        offset += 1 + length
    qtype, qclass = struct.unpack("!HH", packet[offset + 1 : offset + 5])
    return ".".join(labels), qtype, qclass, offset + 5


class DnsServer:
    """`with DnsServer({"decoder.unclip.test": ["127.0.0.1", "127.0.0.2"]}) as dns:` serves on dns.address."""

    def __init__(self, records: dict[str, list[str]], ttl: int = 1):
        self.records = {name.lower().rstrip("."): addresses for name, addresses in records.items()}
        self.ttl = ttl  # seconds; short, so a re-resolution sees a changed record
        self.queries: list[tuple[str, int]] = []  # (name, type) of every query answered
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-server", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._socket.getsockname()
        return f"{host}:{port}"

    def answer(self, query: bytes) -> bytes:
        (query_id, flags), count = struct.unpack("!HH", query[:4]), struct.unpack("!H", query[4:6])[0]
        name, qtype, qclass, end = _parse_question(query)
        self.queries.append((name, qtype))
        known = name in self.records
        addresses = self.records.get(name, []) if qtype == TYPE_A and qclass == CLASS_IN else []
        flags = FLAG_RESPONSE | FLAG_AUTHORITATIVE | (flags & FLAG_RECURSION_DESIRED)
        flags |= 0 if known else RCODE_NXDOMAIN
        header = struct.pack("!HHHHHH", query_id, flags, min(count, 1), len(addresses), 0, 0)
        answers = b"".join(
            struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, self.ttl, 4) + socket.inet_aton(address)
            for address in addresses
        )
        return header + query[12:end] + answers

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                query, client = self._socket.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._socket.sendto(self.answer(query), client)
            except (IndexError, struct.error, UnicodeDecodeError):
                continue  # not a query we understand: no answer, as a real server would drop it

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._socket.close()
