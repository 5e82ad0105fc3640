// Ask a trained model a question: insert a request, then poll it until the listener answers.
//   mongosh "mongodb://localhost:27017/mydb?replicaSet=rs0" deploy/mongosh/predict.js
// Model: MODEL=pirate in the environment, or --eval 'var MODEL = "pirate"' before the file.
const model = (typeof MODEL !== "undefined" && MODEL) || process.env.MODEL || "pirate";
const TIMEOUT_MS = 10 * 60 * 1000;  // the first request may wait for the model to load
const requests = db.getCollection("_requests");

const { insertedId } = requests.insertOne({
  model: model,
  input: [{ role: "user", content: "What is the capital of Italy?" }],
  params: { max_new_tokens: 40 },
});
print(`request ${insertedId} for "${model}"`);

const deadline = Date.now() + TIMEOUT_MS;
let request = requests.findOne({ _id: insertedId });
while (!["done", "failed"].includes(request.status)) {
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
