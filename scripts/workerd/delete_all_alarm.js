export class Obj {
  constructor(ctx, env) { this.ctx = ctx; }
  async fetch(req) {
    const s = this.ctx.storage;
    await s.put("k", 1);
    await s.setAlarm(Date.now() + 60000);
    const before = await s.getAlarm();
    await s.deleteAll();
    const after = await s.getAlarm();
    const k = await s.get("k");
    return Response.json({before: before !== null, after, k: k ?? null});
  }
  async alarm() {}
}
export default {
  async fetch(req, env) {
    const id = env.OBJ.idFromName(new URL(req.url).pathname);
    return env.OBJ.get(id).fetch(req);
  }
}
