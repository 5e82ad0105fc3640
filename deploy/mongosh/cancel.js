// Cancel a model's training; the listener stops it and marks it cancelled (its checkpoints stay).
//   mongosh "mongodb://localhost:27017/mydb?replicaSet=rs0" deploy/mongosh/cancel.js
// Model: MONGOTUNE_MODEL_ID in the environment (default "pirate").
const model = process.env.MONGOTUNE_MODEL_ID || "pirate";
const models = db.getCollection("_models");
const result = models.updateOne(
  { _id: model, status: { $nin: ["succeeded", "failed", "cancelled"] } },  // only a queued or running job
  { $set: { cancel: true } },
);
if (result.matchedCount) {
  print(`cancel requested for "${model}"`);
} else {
  const doc = models.findOne({ _id: model }, { status: 1 });
  print(doc ? `"${model}" is ${doc.status}: nothing to cancel` : `no model "${model}"`);
  quit(1);
}
