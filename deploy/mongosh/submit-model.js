// Submit a model for fine-tuning: a listener claims it, trains it and records progress in the document.
//   mongosh "mongodb://localhost:27017/mydb?replicaSet=rs0" deploy/mongosh/submit-model.js
// Training data: documents in "pirate_chat" shaped {messages: [{role: "user", content}, {role: "assistant", content}]}
// (seed-pirate-chat.js inserts a small set). The listener sets status, progress and metrics.
// Environment: MONGOTUNE_MODEL_ID (default "pirate"), MONGOTUNE_BASE_MODEL (a hub id or a folder under the
// listener's model roots; default SmolLM2-135M-Instruct), MONGOTUNE_COLLECTION (default "pirate_chat").
const models = db.getCollection("_models");
const model = {
  _id: process.env.MONGOTUNE_MODEL_ID || "pirate",
  model_name_or_path: process.env.MONGOTUNE_BASE_MODEL || "HuggingFaceTB/SmolLM2-135M-Instruct",
  data: { collection: process.env.MONGOTUNE_COLLECTION || "pirate_chat", key: "messages" },
  trainer: {
    num_train_epochs: 1,
    per_device_train_batch_size: 4,
    learning_rate: 0.001,
    use_lora: true,
    lora_r: 8,
    lora_alpha: 16,
    save_steps: 20,
    eval_steps: 20,
    logging_steps: 5,
  },
};

const examples = db.getCollection(model.data.collection).countDocuments();
if (examples === 0) {
  print(`"${model.data.collection}" is empty: insert training documents first (seed-pirate-chat.js)`);
  quit(1);
}
try {
  models.insertOne(model);
  print(`submitted "${model._id}" (${examples} training documents); follow it with watch-models.js`);
} catch (e) {
  if (e.code !== 11000) throw e;
  print(`"${model._id}" already exists (status: ${models.findOne({ _id: model._id }).status ?? "not yet claimed"}); retrain it with retrain.js`);
}
