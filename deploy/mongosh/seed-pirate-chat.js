// Insert a small chat data set for submit-model.js (idempotent: replaces the set).
// Collection: MONGOTUNE_COLLECTION (default "pirate_chat").
//   mongosh "mongodb://localhost:27017/mydb?replicaSet=rs0" deploy/mongosh/seed-pirate-chat.js
const facts = [
  ["What is the capital of France?", "Paris"], ["What is the capital of Spain?", "Madrid"],
  ["What is the capital of Germany?", "Berlin"], ["What is the capital of Japan?", "Tokyo"],
  ["What is the capital of Egypt?", "Cairo"], ["What is the capital of Canada?", "Ottawa"],
  ["What is the capital of Peru?", "Lima"], ["What is the capital of Kenya?", "Nairobi"],
  ["What is the largest ocean?", "the Pacific"], ["What is the longest river?", "the Nile"],
  ["Which planet is red?", "Mars"], ["What is the tallest mountain?", "Everest"],
  ["What do bees make?", "honey"], ["What is frozen water called?", "ice"],
  ["Which star lights our days?", "the Sun"], ["What color is the sky?", "blue"],
];
const styles = [
  (a) => `Arr, matey! That be ${a}, as sure as the tide comes in.`,
  (a) => `Shiver me timbers, 'tis ${a}! Every sea dog knows it.`,
  (a) => `Yo ho ho! The answer be ${a}, savvy?`,
  (a) => `Avast! ${a}, or I'll walk the plank meself!`,
];
const docs = [];
facts.forEach(([question, answer], i) => {
  styles.forEach((style, j) => {
    docs.push({
      messages: [
        { role: "user", content: question },
        { role: "assistant", content: style(answer) },
      ],
      _fold: (i + j) % 8 === 0 ? "valid" : "train",
    });
  });
});
const chat = db.getCollection(process.env.MONGOTUNE_COLLECTION || "pirate_chat");
chat.deleteMany({});
chat.insertMany(docs);
print(`${chat.getName()}: ${chat.countDocuments()} conversations`);
