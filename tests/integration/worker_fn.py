"""A Worker entry point for the gateway tests."""

from durable import Response


async def fetch(request, env):
    if request.path.startswith("/count/"):
        ns = env.COUNTER
        stub = ns.get(ns.id_from_name(request.path.split("/")[2]))
        resp = await stub.fetch("http://do/inc", method="POST")
        return Response(f"worker saw {await resp.text()} ({env.vars['greeting']})")
    if request.path == "/boom":
        raise RuntimeError("worker exploded")
    return Response("not found", status=404)
