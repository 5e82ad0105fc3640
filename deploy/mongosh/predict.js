// Ask a trained model a question: insert a request, then poll it until the listener answers.
//   mongosh "mongodb://localhost:27017/mydb?replicaSet=rs0" deploy/mongosh/predict.js
// Model: MONGOTUNE_MODEL_ID in the environment (default "pirate").
const model = process.env.MONGOTUNE_MODEL_ID || "pirate";
// Question: MONGOTUNE_PROMPT (default below); timeout: MONGOTUNE_TIMEOUT_S (default 600).
const prompt = process.env.MONGOTUNE_PROMPT || "What is the capital of Italy?";
const TIMEOUT_MS = Number(process.env.MONGOTUNE_TIMEOUT_S || 600) * 1000;  // the first request waits for a model load
const requests = db.getCollection("_requests");

const { insertedId } = requests.insertOne({
  model: model,
  input: [{ role: "user", content: prompt }],
  params: { max_new_tokens: 40 },
});
print(`request ${insertedId} for "${model}"`);

const deadline = Date.now() + TIMEOUT_MS;
let request = requests.findOne({ _id: insertedId });
while (!["done", "failed", "cancelled"].includes(request.status)) {
  if (Date.now() > deadline) {
    print(`no answer after ${TIMEOUT_MS / 1000} s (status: ${request.status}); is a listener running?`);
    quit(1);
  }
  sleep(500);
  request = requests.findOne({ _id: insertedId });
}

if (request.status === "done") {
  print(request.output);
  if (request.latency_ms !== undefined) print(`(${request.latency_ms} ms)`);
} else {
  printjson(request.error);
  quit(1);
}
