// Follow every model's training as it happens (Ctrl-C to stop), or one model until its run ends.
//   mongosh "mongodb://localhost:27017/mydb?replicaSet=rs0" deploy/mongosh/watch-models.js
// With MONGOTUNE_MODEL_ID set: only that model; exits 0 once it succeeded, 1 if it failed or was cancelled.
const only = process.env.MONGOTUNE_MODEL_ID;
const FINAL = ["succeeded", "failed", "cancelled"];
const models = db.getCollection("_models");
const pipeline = only ? [{ $match: { "documentKey._id": only } }] : [];
const stream = models.watch(pipeline, { fullDocument: "updateLookup" });  // opened first: no change is missed
print(only ? `watching "${only}" until its run ends` : "watching _models; Ctrl-C to stop");

function describe(doc) {
  const parts = [`status=${doc.status}`];
  const p = doc.progress;
  if (p) {
    parts.push(`step=${p.step}/${p.total_steps}`);
    if (p.epoch !== undefined && p.epoch !== null) parts.push(`epoch=${Number(p.epoch).toFixed(2)}`);
    if (p.eta_s !== undefined && p.eta_s !== null) parts.push(`eta=${Math.round(p.eta_s)}s`);
  }
  const last = (doc.metrics || []).at(-1);
  if (last && last.loss !== undefined) parts.push(`loss=${last.loss}`);
  if (last && last.eval_loss !== undefined) parts.push(`eval_loss=${last.eval_loss}`);
  if (doc.error) parts.push(`error=${doc.error.type}: ${doc.error.message}`);
  return parts.join(" ");
}

function finish(doc) {
  if (!only || !doc || !FINAL.includes(doc.status)) return;
  stream.close();
  quit(doc.status === "succeeded" ? 0 : 1);
}

if (only) {
  const current = models.findOne({ _id: only });
  if (!current) print(`no model "${only}" yet; waiting for it`);
  else print(`now ${only} ${describe(current)}`);
  finish(current);
}
while (!stream.isClosed()) {
  const event = stream.tryNext();
  if (event === null) continue;  // tryNext waits on the server for a while; nothing changed
  const id = event.documentKey ? event.documentKey._id : "";
  const when = new Date().toISOString().slice(11, 19);
  const doc = event.fullDocument;
  print(`${when} ${event.operationType} ${id} ${doc ? describe(doc) : ""}`.trimEnd());
  finish(doc);
}
