// The objects of `scripts/bench.py vs-workerd`, for workerd: the same two as durable's side
// (bench_objects:Noop and durable.examples.counter:Counter), routed by /NAMESPACE/NAME/...
export class Noop {
  constructor(ctx, env) {}
  async fetch(req) { return new Response("ok"); }
}
export class Counter {
  constructor(ctx, env) { this.storage = ctx.storage; }
  async fetch(req) {
    let n = (await this.storage.get("count")) || 0;
    if (req.method === "POST") {
      n += 1;
      await this.storage.put("count", n);
    }
    return new Response(String(n));
  }
}
export default {
  async fetch(req, env) {
    const [, ns, name] = new URL(req.url).pathname.split("/");
    const binding = ns === "NOOP" ? env.NOOP : env.COUNTER;
    return binding.get(binding.idFromName(name)).fetch(req);
  }
}
