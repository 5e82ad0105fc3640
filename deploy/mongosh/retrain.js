// Train a model again: a new run starts from the document as it is now; earlier checkpoints stay.
// Like `listener retrain`: only a finished model goes back to "pending", recorded as retrained by a user.
//   mongosh "mongodb://localhost:27017/mydb?replicaSet=rs0" deploy/mongosh/retrain.js
// Model: MONGOTUNE_MODEL_ID in the environment (default "pirate").
const model = process.env.MONGOTUNE_MODEL_ID || "pirate";
const models = db.getCollection("_models");
const result = models.updateOne(
  { _id: model, status: { $in: ["succeeded", "failed", "cancelled"] } },  // never a job still queued or running
  { $set: { status: "pending", trigger: "user" }, $unset: { cancel: "" } },  // a stale cancel would stop the new run
);
if (result.matchedCount) {
  print(`"${model}" queued for a new run`);
} else {
  const doc = models.findOne({ _id: model }, { status: 1 });
  print(doc ? `"${model}" is ${doc.status}: cancel it or let it finish first` : `no model "${model}"`);
  quit(1);
}
