"""The HTTP front's request URLs against aiohttp's own HTTP parser (an aiohttp server on
loopback, raw request lines): ``Gateway._url`` gives what ``str(request.url)`` gives, whether
it joined the URL as text (``plain_url``) or asked yarl. aiohttp's mocked requests (the unit
tests) build their URL differently from its parser for some targets (``//x``), so this is
the check that counts."""

from __future__ import annotations

import asyncio
import random

from aiohttp import web

from durable.broker.gateway import Gateway, plain_url

HOSTS = ["bench", "a.b", "127.0.0.1:8787", "127.000.0.1", "h:80", "h:8080", "h:0", "h:080",
         "x-y.z", "0x7f.1", "localhost:443", "a..b", "-a", "Mixed.Case", "[::1]:8787"]
TARGETS = ["/", "/a?", "/a?b", "/?", "//", "//a", "/a//b", "/.well-known/x", "/a/./b",
           "/a/../b", "/..", "/a.b/c", "/a?x=/../y", "/a?x=1&y=2", "/a;b", "/a:b", "/@", "/~x",
           "/a??b", "/a?x=%20", "/a%2Fb", "/%7e", "/COUNTER/room-1/inc", "/C/id/ab12/x?by=2"]
ALPHABET = "abcXYZ019-._~!$&'()*+,;=:@/?%"


def test_the_front_gives_the_url_aiohttps_parser_gives():
    gw = object.__new__(Gateway)  # (its URL memory only)
    gw._urls = {}
    seen: list[tuple[str, str, str, str]] = []

    async def handler(request: web.BaseRequest) -> web.Response:
        seen.append((request.host, request.raw_path, str(request.url), gw._url(request)))
        return web.Response(text="ok")

    async def run() -> None:
        runner = web.ServerRunner(web.Server(handler))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        rnd = random.Random(18)
        targets = TARGETS + ["/" + "".join(rnd.choice(ALPHABET) for _ in range(rnd.randint(0, 14)))
                             for _ in range(300)]
        try:
            for i, target in enumerate(targets):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:  # (one connection a request or host: a 400 closes it)
                    for host in (HOSTS if i < len(TARGETS) else rnd.sample(HOSTS, 3)):
                        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                        head = await reader.readuntil(b"\r\n\r\n")
                        if not head.startswith(b"HTTP/1.1 200"):
                            break  # (a target aiohttp refuses: no URL to compare)
                        await reader.readexactly(2)
                finally:
                    writer.close()
        finally:
            await runner.cleanup()

    asyncio.run(run())
    wrong = [s for s in seen if s[2] != s[3]]
    assert not wrong, wrong[:10]
    plain = sum(1 for host, target, _, _ in seen if plain_url("http", host, target) is not None)
    assert len(seen) > 900 and 300 < plain < len(seen), (len(seen), plain)
