// The official openai package for Node, unchanged, against chatd (run by test_clients.py).
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2] + "/v1", apiKey: "unused", maxRetries: 0 });
const request = {
  model: "smollm2-135m-instruct",
  messages: [{ role: "user", content: "What is the capital of France?" }],
  temperature: 0,
  max_tokens: 16,
};
const whole = await client.chat.completions.create(request);
let streamed = "";
for await (const chunk of await client.chat.completions.create({ ...request, stream: true })) {
  streamed += chunk.choices[0]?.delta?.content ?? "";
}
console.log(JSON.stringify({ whole: whole.choices[0].message.content, streamed, finish: whole.choices[0].finish_reason }));
