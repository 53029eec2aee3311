// Streams one chat completion with an image from the proxy through the OpenAI Node SDK and
// prints one JSON line per chunk: {id, model, delta, usage}. Run by tests/test_progress.py.
//
//   OCRPROXY_URL=http://127.0.0.1:PORT/v1 OCRPROXY_KEY=sk-... \
//     node progress_stream.mjs <model> <image data: URL>
import OpenAI from "openai";

const [model, imageUrl] = process.argv.slice(2);
const client = new OpenAI({
  baseURL: process.env.OCRPROXY_URL,
  apiKey: process.env.OCRPROXY_KEY,
  maxRetries: 0,
});
const stream = await client.chat.completions.create({
  model,
  stream: true,
  stream_options: { include_usage: true },
  messages: [
    {
      role: "user",
      content: [
        { type: "text", text: "What does it say?" },
        { type: "image_url", image_url: { url: imageUrl } },
      ],
    },
  ],
});
for await (const chunk of stream) {
  const delta = chunk.choices[0]?.delta ?? null;
  const line = { id: chunk.id, model: chunk.model, delta, usage: chunk.usage ?? null };
  process.stdout.write(JSON.stringify(line) + "\n");
}
