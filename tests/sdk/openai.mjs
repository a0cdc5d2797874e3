// Drives semcache with the official OpenAI client for JavaScript: for each surface, a miss and
// then a hit (a reworded prompt), streamed and not, each read the way applications read them;
// for embeddings, a batch and then a batch partly cached.
// Prints one JSON line: per case, the `x-semcache` header of both calls and what the client
// parsed of each (text, finish reason, usage, id). tests/it/sdk.rs checks it.
//
//   node tests/sdk/openai.mjs http://127.0.0.1:PORT

import OpenAI from 'openai';

const base = process.argv[2];
if (!base) {
  process.stderr.write('usage: node openai.mjs BASE_URL\n');
  process.exit(2);
}
const client = new OpenAI({ apiKey: 'sk-sdk-conformance', baseURL: `${base}/v1`, maxRetries: 0 });
const system = { role: 'system', content: 'You are a helpful support assistant.' };

async function chat(prompt) {
  const { data, response } = await client.chat.completions
    .create({ model: 'gpt-4o-mini', messages: [system, { role: 'user', content: prompt }] })
    .withResponse();
  const choice = data.choices[0];
  return {
    cache: response.headers.get('x-semcache'),
    id: data.id,
    object: data.object,
    text: choice.message.content,
    role: choice.message.role,
    tool_calls: choice.message.tool_calls ?? null,
    finish_reason: choice.finish_reason,
    usage: data.usage,
  };
}

async function chatStream(prompt) {
  const { data, response } = await client.chat.completions
    .create({
      model: 'gpt-4o-mini',
      messages: [system, { role: 'user', content: prompt }],
      stream: true,
      stream_options: { include_usage: true },
    })
    .withResponse();
  let text = '';
  let role = null;
  let finish = null;
  let usage = null;
  let id = null;
  for await (const chunk of data) {
    id = id ?? chunk.id;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      role = role ?? choice.delta.role ?? null;
      text += choice.delta.content ?? '';
      finish = choice.finish_reason ?? finish;
    }
  }
  return { cache: response.headers.get('x-semcache'), id, text, role, finish_reason: finish, usage };
}

async function completion(prompt) {
  const { data, response } = await client.completions
    .create({ model: 'gpt-3.5-turbo-instruct', prompt, max_tokens: 40 })
    .withResponse();
  const choice = data.choices[0];
  return {
    cache: response.headers.get('x-semcache'),
    id: data.id,
    object: data.object,
    text: choice.text,
    finish_reason: choice.finish_reason,
    usage: data.usage,
  };
}

async function completionStream(prompt) {
  const { data, response } = await client.completions
    .create({
      model: 'gpt-3.5-turbo-instruct',
      prompt,
      max_tokens: 40,
      stream: true,
      stream_options: { include_usage: true },
    })
    .withResponse();
  let text = '';
  let finish = null;
  let usage = null;
  let id = null;
  for await (const chunk of data) {
    id = id ?? chunk.id;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      text += choice.text ?? '';
      finish = choice.finish_reason ?? finish;
    }
  }
  return { cache: response.headers.get('x-semcache'), id, text, finish_reason: finish, usage };
}

async function embeddings(texts) {
  const { data, response } = await client.embeddings
    .create({ model: 'text-embedding-3-small', input: texts })
    .withResponse();
  return {
    cache: response.headers.get('x-semcache'),
    cached_items: response.headers.get('x-semcache-cached-items'),
    object: data.object,
    vectors: data.data.map((item) => Array.from(item.embedding)),
    usage: data.usage,
  };
}

const password = ['How do I reset my password?', 'How can I reset my password?'];
const sunday = ['What are your opening hours on Sunday?', 'When are you open on Sundays?'];
const cases = {
  chat: [chat, password],
  chat_stream: [chatStream, sunday],
  // The same prompts on the legacy surface: answers are kept apart per surface.
  completions: [completion, password],
  completions_stream: [completionStream, sunday],
  // A batch, then the same batch with one more text: the second is partly cached.
  embeddings: [embeddings, [['first text', 'second text'], ['second text', 'third text', 'first text']]],
};

const report = {};
for (const [name, [run, [first, reworded]]] of Object.entries(cases)) {
  try {
    report[name] = [await run(first), await run(reworded)];
  } catch (err) {
    report[name] = { error: `${err.name}: ${err.message}` };
  }
}
process.stdout.write(JSON.stringify(report) + '\n');
