"""The workerd configuration (Cap'n Proto text) that the scripts comparing with workerd use:
one worker module, Durable Objects on local disk, one binding per class."""

from __future__ import annotations

from pathlib import Path


def workerd_config(*, disk: Path, port: int, date: str, classes: dict[str, str]) -> str:
    """``worker.js`` beside the config serves 127.0.0.1:``port``; ``classes`` maps each
    binding name to its Durable Object class."""
    namespaces = ",\n    ".join(f'(className = "{c}", uniqueKey = "{c.lower()}-key")'
                                for c in classes.values())
    bindings = ",\n    ".join(f'(name = "{b}", durableObjectNamespace = "{c}")'
                              for b, c in classes.items())
    return f"""using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [ (name = "main", worker = .w),
               (name = "disk", disk = (path = "{disk}", writable = true)) ],
  sockets = [ (name = "http", address = "127.0.0.1:{port}", http = (), service = "main") ],
);
const w :Workerd.Worker = (
  modules = [ (name = "worker.js", esModule = embed "worker.js") ],
  compatibilityDate = "{date}",
  durableObjectNamespaces = [
    {namespaces} ],
  durableObjectStorage = (localDisk = "disk"),
  bindings = [
    {bindings} ],
);
"""
