"""Objects used by the integration tests (imported by real object processes)."""

import asyncio
import gc
import os
import signal
import sys
import time
import weakref
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

from durable import DurableObject, Request, Response, WebSocketPair


def query(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}


class Counter(DurableObject):
    async def fetch(self, request: Request) -> Response:
        n = (await self.state.storage.get("n")) or 0
        if request.method == "POST":
            n += int(query(request).get("by", "1"))
            await self.state.storage.put("n", n)
        return Response(str(n))


class Noop(DurableObject):
    async def fetch(self, request: Request) -> Response:
        if request.method == "PUT":  # echo: bodies of every size cross both hops intact
            return Response(await request.bytes(), headers={"x-len": str(len(await request.bytes()))})
        if "bytes" in query(request):  # a body of that size
            return Response(b"x" * int(query(request)["bytes"]))
        return Response(b"ok")


class Recorder(DurableObject):
    """Appends ?n= to a stored list in arrival order; GET returns the list."""

    async def fetch(self, request: Request) -> Response:
        seen = (await self.state.storage.get("seen")) or []
        if request.method == "POST":
            seen.append(int(query(request)["n"]))
            await self.state.storage.put("seen", seen)
            if query(request).get("yield"):
                await asyncio.sleep(0)
        return Response.json(seen)


class Failing(DurableObject):
    async def fetch(self, request: Request) -> Response:
        if request.method == "POST":
            await self.state.storage.put("before-raise", query(request).get("v", "x"))
            raise ValueError("boom: " + query(request).get("v", "x"))
        if request.method == "PUT":  # a Response spoiled after it was built
            resp = Response("x")
            resp.status = object()
            return resp
        return Response.json(await self.state.storage.get("before-raise"))


class Caller(DurableObject):
    """Calls COUNTER/<name> through env and returns what it answered."""

    async def fetch(self, request: Request) -> Response:
        ns = self.env.COUNTER
        stub = ns.get(ns.id_from_name(query(request)["name"]))
        resp = await stub.fetch("http://do/inc", method="POST")
        return Response(f"via env: {await resp.text()} {self.env.vars.get('greeting')}")


class Setup(DurableObject):
    """Uses block_concurrency_while in its constructor: no call sees it half set up."""

    def __init__(self, state, env):
        super().__init__(state, env)
        self.ready = False

        async def load():
            await asyncio.sleep(0.05)
            self.ready = True

        state.block_concurrency_while(load)

    async def fetch(self, request: Request) -> Response:
        return Response("ready" if self.ready else "NOT READY")


class Slow(DurableObject):
    """Sleeps ?s= seconds before answering (a call that keeps a graceful stop waiting);
    ?sleeping=1 answers how many calls of this process sleep now."""

    sleeping = 0

    async def fetch(self, request: Request) -> Response:
        q = query(request)
        if "sleeping" in q:
            return Response(str(Slow.sleeping))
        Slow.sleeping += 1
        try:
            await asyncio.sleep(float(q.get("s", "1")))
        finally:
            Slow.sleeping -= 1
        return Response("slept")


class KV(DurableObject):
    """POST ?k=&v= stores one key (PUT stores the body under ?k=); GET returns every key."""

    async def fetch(self, request: Request) -> Response:
        q = query(request)
        if request.method == "POST":
            if q.get("twin"):  # two keys in one atomic put: a restore must hold both or neither
                await self.state.storage.put({q["k"]: q.get("v", ""), q["k"] + "~": q.get("v", "")})
            else:
                await self.state.storage.put(q["k"], q.get("v", ""))
            return Response("stored")
        if request.method == "PUT":
            await self.state.storage.put(q["k"], await request.bytes())
            return Response("stored")
        if "k" in q:
            v = await self.state.storage.get(q["k"])
            return Response.json(v if not isinstance(v, bytes) else len(v))
        rows = await self.state.storage.list()
        return Response.json({k: (len(v) if isinstance(v, bytes) else v) for k, v in rows.items()})


class Busy(DurableObject):
    """Blocks its process's loop for ?s= seconds (a pure-Python spin; ?gil=1: holding the GIL),
    holding ?mb= MiB of RSS."""

    calls = 0  # in memory: a reset starts it again

    async def fetch(self, request: Request) -> Response:
        self.calls += 1
        q = query(request)
        if urlsplit(request.url).path.endswith("/count"):
            await self.state.storage.put("count-calls", self.calls)
            return Response(str(self.calls))
        await self.state.storage.put("spun", True)  # durable writes survive a reset
        if "sleep" in q:  # holds the loop without using CPU: not the CPU limit's business
            time.sleep(float(q["sleep"]))  # noqa: ASYNC251 - blocking the loop is the point
            return Response("slept")
        hold = bytearray(int(q.get("mb", "0")) << 20)
        for i in range(0, len(hold), 4096):  # touch each page: calloc'd pages are not RSS yet
            hold[i] = 1
        seconds = float(q.get("s", "1"))
        # ?gil=1: the spin keeps the GIL throughout, as one long call into C code does (a
        # regex, a big encode): the process's other threads wait for it meanwhile
        interval = sys.getswitchinterval()
        if q.get("gil"):
            sys.setswitchinterval(seconds + 5)
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                pass
        finally:
            sys.setswitchinterval(interval)
        return Response(f"busy {len(hold)}")


class Lingerer(DurableObject):
    """POST /start?mode=: writes n=1 and starts a task that writes n=101 after ?after= s.

    mode=plain: the task sleeps, then writes; mode=stubborn: it ignores cancellation;
    mode=wait_until: the same work handed to state.wait_until (finishes before eviction).
    GET returns {"n": ..., "task": what the task saw}.
    """

    async def fetch(self, request: Request) -> Response:
        q = query(request)
        storage = self.state.storage
        if request.method == "POST":
            await storage.put("n", 1)
            after, mode = float(q.get("after", "3")), q.get("mode", "plain")
            if mode == "wait_until":
                self.state.wait_until(self._later(after, stubborn=False))
            else:
                asyncio.create_task(self._later(after, stubborn=mode == "stubborn"))
            return Response("started")
        return Response.json({"n": await storage.get("n"), "task": await storage.get("task")})

    async def _later(self, after: float, stubborn: bool) -> None:
        end = asyncio.get_running_loop().time() + after
        while (left := end - asyncio.get_running_loop().time()) > 0:
            try:
                await asyncio.sleep(left)
            except asyncio.CancelledError:
                if not stubborn:
                    raise
        await self.state.storage.put({"n": 101, "task": "wrote"})


class Relay(DurableObject):
    """A: POST ?seq=&to=<name>&pid=: stores seq, then asks RELAY/<to> to act on it.
    B: PUT ?seq=&pid=: records seq durably, then SIGKILLs pid (A's process).
    GET: {"n": A's stored seq, "seen": B's recorded seqs}."""

    async def fetch(self, request: Request) -> Response:
        q = query(request)
        storage = self.state.storage
        if request.method == "POST":
            await storage.put("n", int(q["seq"]))
            ns = self.env.RELAY
            stub = ns.get(ns.id_from_name(q["to"]))
            await stub.fetch(f"http://do/?seq={q['seq']}&pid={os.getpid()}", method="PUT")
            return Response("sent")
        if request.method == "PUT":
            seen = (await storage.get("seen")) or []
            await storage.put("seen", [*seen, int(q["seq"])])
            await storage.sync()
            os.kill(int(q["pid"]), signal.SIGKILL)
            return Response("acted")
        return Response.json({"n": await storage.get("n"), "seen": await storage.get("seen")})


_setup_failures: dict[str, int] = {}


class FlakySetup(DurableObject):
    """Its constructor's block_concurrency_while fails the first ?fail= times (per process)."""

    def __init__(self, state, env):
        super().__init__(state, env)
        self.ready = False

        async def load():
            key = str(state.id)
            _setup_failures[key] = _setup_failures.get(key, 0) + 1
            if _setup_failures[key] == 1:
                raise RuntimeError("set-up failed (first time)")
            self.ready = True

        state.block_concurrency_while(load)

    async def fetch(self, request: Request) -> Response:
        return Response("ready" if self.ready else "NOT READY")


class Named(DurableObject):
    """Answers with state.id.name, and counts calls in memory (a reset starts again at 1)."""

    calls = 0

    async def fetch(self, request: Request) -> Response:
        self.calls += 1
        return Response.json({"name": self.state.id.name, "id": str(self.state.id),
                              "calls": self.calls})


class Raiser(DurableObject):
    """GET raises ValueError; POST stores a value over the limit (StorageLimitError, uncaught)."""

    async def fetch(self, request: Request) -> Response:
        if request.method == "POST":
            await self.state.storage.put("big", "x" * 100_000)
        raise ValueError("boom from Raiser")


_constructions: dict[str, int] = {}


class FlakyConstructor(DurableObject):
    """Its constructor raises the first time (per process); then it works."""

    def __init__(self, state, env):
        super().__init__(state, env)
        key = str(state.id)
        _constructions[key] = _constructions.get(key, 0) + 1
        if _constructions[key] == 1:
            raise KeyError("no such setting (first time)")

    async def fetch(self, request: Request) -> Response:
        return Response("constructed")


class FailsOnReturn(DurableObject):
    """Its constructor raises the second time (per process): when it comes back after an
    eviction, with rows to read first. POST stores ``v``; GET answers it."""

    def __init__(self, state, env):
        super().__init__(state, env)
        key = "return/" + str(state.id)
        _constructions[key] = _constructions.get(key, 0) + 1
        if _constructions[key] == 2:
            raise KeyError("no such setting (on return)")

    async def fetch(self, request: Request) -> Response:
        if request.method == "POST":
            await self.state.storage.put("v", "kept")
        return Response(str(await self.state.storage.get("v")))


class Hog(DurableObject):
    """Keeps ?mb= MiB of touched memory for as long as its process lives."""

    kept: list[bytearray] = []

    async def fetch(self, request: Request) -> Response:
        block = bytearray(int(query(request).get("mb", "1")) << 20)
        for i in range(0, len(block), 4096):  # touched pages count as RSS
            block[i] = 1
        Hog.kept.append(block)
        return Response(str(sum(len(b) for b in Hog.kept) >> 20))


class NotFound(KeyError):
    """A user exception that derives from a builtin one (the caller may catch KeyError)."""


class Account(DurableObject):
    """Methods on stubs: plain and async, writes, errors, calls to other objects; ``fetch``
    and methods append to one log, so their order can be checked."""

    async def fetch(self, request: Request) -> Response:
        n = int(query(request)["n"])
        await self._log(n)
        return Response(str(n))

    async def _log(self, n: int) -> None:
        log = (await self.state.storage.get("log")) or []
        log.append(n)
        await self.state.storage.put("log", log)

    async def record(self, n: int) -> int:
        await self._log(n)
        return n

    async def log(self) -> list:
        return (await self.state.storage.get("log")) or []

    async def deposit(self, amount: int, *, memo: str = "") -> int:
        balance = (await self.state.storage.get("balance")) or 0
        balance += amount
        await self.state.storage.put("balance", balance)
        if memo:
            await self.state.storage.put("memo", memo)
        return balance

    def echo(self, *args, **kwargs):  # a plain def, returning what it got
        return args, kwargs

    async def blob(self, n: int) -> bytes:
        return b"x" * n

    async def unawaited(self, n: int) -> int:
        """Writes without ``await`` (as workerd allows): made all the same, and durable before
        the answer leaves."""
        self.state.storage.put("u", n)
        self.state.storage.put({f"u{i}": i for i in range(n)})
        self.state.storage.delete("u0")
        return n

    async def noop(self) -> None:
        return None

    async def write_then_raise(self, value: str) -> None:
        await self.state.storage.put("before-raise", value)
        raise ValueError(f"refused {value}")

    async def get(self, key: str):
        return await self.state.storage.get(key)

    async def missing(self, key: str):
        raise NotFound(key)

    async def transfer(self, to_name: str, amount: int) -> int:
        """Object to object: a method call on another object's stub."""
        await self.deposit(-amount)
        other = self.env.ACCOUNT.get_by_name(to_name)
        return await other.deposit(amount, memo=f"from {self.state.id.name}")

    async def whoami(self):
        return self.state.id

    async def pid(self) -> int:
        return os.getpid()


class Alarmed(DurableObject):
    """Alarms: ``arm(at_ms)`` sets one; ``alarm`` records each run (time, retry) in storage,
    raises while ``fail`` > 0 (counting down), and re-arms ``repeat`` times."""

    async def arm(self, at_ms: float, *, fail: int = 0, repeat: int = 0, every_ms: int = 100) -> int:
        await self.state.storage.put({"fail": fail, "repeat": repeat, "every": every_ms})
        await self.state.storage.set_alarm(at_ms)
        return await self.state.storage.get_alarm()

    async def alarm(self, info) -> None:
        now = int(time.time() * 1000)
        runs = (await self.state.storage.get("runs")) or []
        runs.append([now, info.retry_count, info.is_retry, await self.state.storage.get_alarm()])
        await self.state.storage.put("runs", runs)
        fail = (await self.state.storage.get("fail")) or 0
        if fail > 0:
            await self.state.storage.put("fail", fail - 1)
            raise RuntimeError(f"failing on purpose ({fail} more)")
        repeat = (await self.state.storage.get("repeat")) or 0
        if repeat > 0:
            await self.state.storage.put("repeat", repeat - 1)
            await self.state.storage.set_alarm(now + await self.state.storage.get("every"))

    async def runs(self) -> list:
        return (await self.state.storage.get("runs")) or []

    async def alarm_at(self):
        return await self.state.storage.get_alarm()

    async def cancel(self) -> None:
        await self.state.storage.delete_alarm()

    async def replace_slowly(self, due_ms: float, hold: float) -> None:
        """Hold the loop past the old alarm's time, replace it, then really wait: the old
        one's timer fires before the replacement is durable (the scheduler still has it)."""
        time.sleep(hold)  # noqa: ASYNC251 (the point: the loop is held)
        await self.state.storage.set_alarm(due_ms)
        await asyncio.sleep(0.05)

    async def pid(self) -> int:
        return os.getpid()


class NoAlarmHandler(DurableObject):
    async def try_set(self) -> None:
        await self.state.storage.set_alarm(time.time() * 1000 + 1000)


class Room(DurableObject):
    """WebSockets: echo, broadcast, tags, attachments, auto-response, closes (#15)."""

    constructed: ClassVar[dict[str, int]] = {}

    def __init__(self, state, env):
        super().__init__(state, env)
        key = str(state.id)
        Room.constructed[key] = Room.constructed.get(key, 0) + 1

    async def fetch(self, request):
        q = parse_qs(urlsplit(request.url).query)
        if request.path.endswith("/auto"):
            self.state.set_websocket_auto_response(q.get("req", ["ping"])[0], q.get("resp", ["pong"])[0])
            return Response("set")
        if request.path.endswith("/count"):
            return Response(str(len(self.state.get_websockets(q.get("tag", [None])[0]))))
        if request.path.endswith("/broadcast"):
            for ws in self.state.get_websockets():
                ws.send(await request.text())
            return Response("sent")
        if request.path.endswith("/no-accept"):
            client, _server = WebSocketPair()
            return Response(status=101, websocket=client)
        if not request.is_websocket:
            return Response("expected a WebSocket upgrade", status=426)
        if request.path.endswith("/refuse"):
            return Response("no", status=403)
        client, server = WebSocketPair()
        self.state.accept_websocket(server, tags=q.get("tag", []))
        name = q.get("name", ["anon"])[0]
        server.serialize_attachment({"name": name})
        await self.state.storage.put("joined", (await self.state.storage.get("joined") or 0) + 1)
        server.send(f"welcome {name}")
        return Response(status=101, websocket=client)

    async def websocket_message(self, ws, message):
        if isinstance(message, bytes):
            ws.send(message[::-1])
        elif message == "who":
            ws.send(ws.deserialize_attachment()["name"])
        elif message == "tags":
            ws.send(",".join(ws.tags))
        elif message.startswith("all:"):
            for other in self.state.get_websockets():
                other.send(message[4:])
        elif message.startswith("close:"):
            ws.close(int(message[6:]), "bye")
        elif message == "constructed":
            ws.send(str(Room.constructed[str(self.state.id)]))
        elif message.startswith("put:"):
            await self.state.storage.put("last", message[4:])
            ws.send("stored")
        elif message == "big":
            ws.send("x" * (2 << 20))
        elif message.startswith("flood:"):
            for i in range(int(message[6:])):
                ws.send(f"{i:08d}" + "y" * 1016)
        else:
            ws.send("echo:" + message)

    async def websocket_close(self, ws, code, reason, was_clean):
        closes = await self.state.storage.get("closes") or []
        closes.append([ws.deserialize_attachment()["name"], code, reason, was_clean])
        await self.state.storage.put("closes", closes)

    async def websocket_error(self, ws, error):
        await self.state.storage.put("error", str(error))

    async def closes(self):
        return await self.state.storage.get("closes") or []

    async def stored(self, key):
        return await self.state.storage.get(key)

    async def constructions(self):
        return Room.constructed[str(self.state.id)]


class Streamer(DurableObject):
    """Streamed bodies: timed chunks, SSE, failure, cancellation (#15)."""

    cancelled: ClassVar[dict[str, int]] = {}

    async def fetch(self, request):
        q = parse_qs(urlsplit(request.url).query)
        n, delay = int(q.get("n", ["3"])[0]), float(q.get("delay", ["0"])[0])
        size = int(q.get("size", ["0"])[0])
        key = str(self.state.id)

        async def chunks():
            try:
                for i in range(n):
                    if i and delay:
                        await asyncio.sleep(delay)
                    if request.path.endswith("/fail") and i == 2:
                        raise RuntimeError("the producer broke")
                    if request.path.endswith("/sse"):
                        yield f"data: event {i}\n\n"
                    elif size:
                        yield bytes([i % 256]) * size
                    else:
                        yield f"chunk {i}\n"
            except asyncio.CancelledError:
                Streamer.cancelled[key] = Streamer.cancelled.get(key, 0) + 1
                raise

        headers = {"content-type": "text/event-stream"} if request.path.endswith("/sse") else None
        return Response(chunks(), headers=headers)

    async def cancellations(self):
        return Streamer.cancelled.get(str(self.state.id), 0)


class WsCaller(DurableObject):
    """Opens a WebSocket to a ROOM from inside an object (env.ROOM stubs)."""

    async def talk(self, room: str) -> list:
        await self.state.storage.put("before", True)  # (the socket opens behind this write)
        async with self.env.ROOM.get_by_name(room).websocket("/join?name=obj") as ws:
            got = [await ws.receive(timeout=5)]
            await ws.send("from an object")
            got.append(await ws.receive(timeout=5))
        return got


class WsHolder(DurableObject):
    """Holds a WebSocket to a ROOM open in its process between calls (the peer path's ends)."""

    held: ClassVar[dict[str, object]] = {}

    async def hold_open(self, room: str) -> str:
        ws = await self.env.ROOM.get_by_name(room).websocket("/join?name=holder")
        WsHolder.held[room] = ws
        return await ws.receive(timeout=5)

    async def ended(self, room: str) -> list:
        """How the held socket ended: [code, reason], or [] while it is open."""
        ws = WsHolder.held[room]
        try:
            while True:
                await ws.receive(timeout=0.05)
        except TimeoutError:
            return []
        except Exception as e:
            return [getattr(ws, "close_code", None), f"{type(e).__name__}: {e}"]

    async def pid(self) -> int:
        return os.getpid()


class SecretReader(DurableObject):
    """Returns what it sees in env.secrets (#19)."""

    async def secrets(self) -> dict:
        return dict(self.env.secrets)


class Store(DurableObject):
    """Storage by method: any value, any keys, alarms (the query and export tests)."""

    async def put(self, entries: dict) -> int:
        await self.state.storage.put(entries)
        return len(entries)

    async def get(self, key: str):
        return await self.state.storage.get(key)

    async def everything(self) -> dict:
        return await self.state.storage.list()

    async def delete_all(self) -> None:
        await self.state.storage.delete_all()

    async def arm(self, at_ms: float) -> None:
        await self.state.storage.set_alarm(at_ms)

    async def alarm(self, info=None) -> None:  # armed far ahead in the tests: never runs
        await self.state.storage.put("alarm ran", True)


class Pipeliner(DurableObject):
    """Calls from an object to objects of another slot: the peer path (docs/messaging.md)."""

    kept: ClassVar[dict[str, object]] = {}

    async def pipeline(self, recorder: str, n: int) -> list:
        """``n`` calls to one RECORDER, all sent before the first answer: its list is their
        order of arrival."""
        stub = self.env.RECORDER.get_by_name(recorder)
        await asyncio.gather(*(stub.fetch(f"http://r/?n={i}", method="POST") for i in range(n)))
        return await (await stub.fetch("http://r/")).json()

    async def hold(self, name: str, seconds: float) -> str:
        """A long call to SLOW ``name``: what became of it, and after how long."""
        started = time.monotonic()
        try:
            await self.env.SLOW.get_by_name(name).fetch(f"http://s/?s={seconds}", timeout=60)
            outcome = "answered"
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
        return f"{time.monotonic() - started:.3f} {outcome}"

    async def keep(self, name: str) -> str:
        """Make a COUNTER stub and keep it in this process (a stub outlives its call)."""
        stub = Pipeliner.kept[name] = self.env.COUNTER.get_by_name(name)
        return await (await stub.fetch("http://c/", method="POST")).text()

    async def use_kept(self, name: str) -> str:
        try:
            return await (await Pipeliner.kept[name].fetch("http://c/", method="POST")).text()
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    async def stream(self, name: str) -> list:
        """A streamed body read from STREAMER ``name``, chunk by chunk."""
        resp = await self.env.STREAMER.get_by_name(name).fetch("http://s/?n=5&delay=0.01")
        return [chunk.decode() async for chunk in resp.iter_chunks()]

    async def peers(self) -> dict:
        """This process's peer figures (``durable.peers``)."""
        peers = self.env.RECORDER._client.peers
        return {} if peers is None else peers.statistics()


class Cyclic(DurableObject):
    """An instance that refers to itself: once evicted, only a full collection frees it."""

    def __init__(self, state, env) -> None:  # noqa: ANN001
        super().__init__(state, env)
        self.me = self

    async def touch(self) -> int:
        return 1


class _Cycle:
    """A reference cycle (it holds itself) with a block of memory: reference counting never
    frees it; only the collector does."""

    __slots__ = ("me", "block", "__weakref__")

    def __init__(self, size: int) -> None:
        self.me = self
        self.block = bytearray(size)


class Churn(DurableObject):
    """Each call makes a reference cycle of ``mib`` MiB and keeps it until the next call:
    garbage that survived at least one tick of its process's collector, so frozen
    (objectproc/collector.py). ``dropped()`` says how many of those it let go are still
    alive, and how many it let go."""

    def __init__(self, state, env) -> None:  # noqa: ANN001
        super().__init__(state, env)
        self.held: _Cycle | None = None
        self.let_go: list = []  # weak references to the cycles it dropped

    async def churn(self, mib: int = 8) -> int:
        if self.held is not None:
            self.let_go.append(weakref.ref(self.held))
        self.held = _Cycle(mib << 20)
        return len(self.let_go)

    async def dropped(self) -> list[int]:
        return [sum(r() is not None for r in self.let_go), len(self.let_go)]


class Collector(DurableObject):
    """Runs a full collection of the garbage collector in its object process."""

    async def collect(self) -> int:
        return gc.collect()

    def block(self, seconds: float) -> float:
        """Hold its process's loop (a blocking call in object code, as users write by mistake)."""
        time.sleep(seconds)
        return seconds
