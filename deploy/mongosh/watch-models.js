// Follow every model's training as it happens (Ctrl-C to stop).
//   mongosh "mongodb://localhost:27017/mydb?replicaSet=rs0" deploy/mongosh/watch-models.js
const stream = db.getCollection("_models").watch([], { fullDocument: "updateLookup" });
print("watching _models; Ctrl-C to stop");

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

while (!stream.isClosed()) {
  const event = stream.tryNext();
  if (event === null) continue;  // tryNext waits on the server for a while; nothing changed
  const id = event.documentKey ? event.documentKey._id : "";
  const when = new Date().toISOString().slice(11, 19);
  const doc = event.fullDocument;
  print(`${when} ${event.operationType} ${id} ${doc ? describe(doc) : ""}`.trimEnd());
}
