#!/usr/bin/env node
// Drives moleserve's OpenAI-compatible HTTP API with the official `openai` SDK for JavaScript,
// as users' tools do. Prints one line per check and exits non-zero when any fails.
//
//   node client_test.js BASE_URL BASE_MODEL ADAPTER
//
// BASE_URL: http://127.0.0.1:PORT/v1; the server runs a chat template (ChatML) and the adapter.
'use strict';

const OpenAI = require('openai');

const [baseURL, baseModel, adapter] = process.argv.slice(2);
if (!adapter) {
  console.error('usage: node client_test.js BASE_URL BASE_MODEL ADAPTER');
  process.exit(2);
}
const client = new OpenAI({ apiKey: 'unused', baseURL, maxRetries: 0, timeout: 60000 });

let failed = 0;
const check = (ok, what) => {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failed++;
};

async function expectError(promise, type, status, param, what) {
  try {
    await promise;
    check(false, `${what}: no error`);
  } catch (e) {
    check(e instanceof type && e.status === status && (!param || e.param === param),
          `${what}: ${e.constructor.name} ${e.status} param=${e.param} (${e.message})`);
  }
}

async function main() {
  // Models: the base model and the adapter, with its parent.
  const models = [];
  for await (const m of client.models.list()) models.push(m);
  check(models.length === 2 && models[0].id === baseModel && models[1].id === adapter &&
        models[1].parent === baseModel, `models.list: ${models.map((m) => m.id).join(', ')}`);
  const one = await client.models.retrieve(adapter);
  check(one.id === adapter, 'models.retrieve');

  for (const model of [baseModel, adapter]) {
    // Completions: whole, then streamed to the same text; usage as OpenAI reports it.
    // ignore_eos (an extension): the demo model's random weights may sample EOS early.
    const params = {
      model, prompt: 'The capital of France is', max_tokens: 10, temperature: 0, ignore_eos: true,
    };
    const whole = await client.completions.create(params);
    check(whole.choices.length === 1 && whole.choices[0].finish_reason === 'length' &&
          whole.usage.completion_tokens === 10 &&
          whole.usage.total_tokens === whole.usage.prompt_tokens + 10,
          `${model}: completions.create (${JSON.stringify(whole.choices[0].text)})`);
    const stream = await client.completions.create({
      ...params, stream: true, stream_options: { include_usage: true },
    });
    let text = '';
    let usage = null;
    for await (const chunk of stream) {
      if (chunk.choices.length > 0) text += chunk.choices[0].text;
      if (chunk.usage) usage = chunk.usage;
    }
    check(text === whole.choices[0].text && usage && usage.completion_tokens === 10,
          `${model}: streamed completion equals the whole one`);

    // Chat completions: whole and streamed.
    const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi!' }];
    const chat = await client.chat.completions.create({
      model, messages, max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 3, ignore_eos: true,
    });
    const c0 = chat.choices[0];
    check(chat.object === 'chat.completion' && c0.message.role === 'assistant' &&
          c0.logprobs.content.length === 8 && c0.logprobs.content[0].top_logprobs.length === 3,
          `${model}: chat.completions.create (${JSON.stringify(c0.message.content)})`);
    const chatStream = await client.chat.completions.create({
      model, messages, max_tokens: 8, temperature: 0, stream: true, ignore_eos: true,
    });
    let chatText = '';
    let role = null;
    let finish = null;
    for await (const chunk of chatStream) {
      const delta = chunk.choices[0].delta;
      if (delta.role) role = delta.role;
      if (delta.content) chatText += delta.content;
      if (chunk.choices[0].finish_reason) finish = chunk.choices[0].finish_reason;
    }
    check(role === 'assistant' && chatText === c0.message.content && finish === 'length',
          `${model}: streamed chat equals the whole one`);
  }

  // n > 1, seeded: reproducible choices.
  const seeded = { model: adapter, prompt: 'Hello', max_tokens: 6, n: 3, seed: 11, temperature: 1 };
  const a = await client.completions.create(seeded);
  const b = await client.completions.create(seeded);
  check(a.choices.length === 3 && JSON.stringify(a.choices) === JSON.stringify(b.choices),
        'n = 3 with a seed: three choices, the same twice');

  // A stop string split across stream chunks still stops the text before it: two printable
  // ASCII characters of the greedy text (the demo model writes random bytes).
  const greedy = (await client.completions.create({
    model: baseModel, prompt: 'Once upon', max_tokens: 48, temperature: 0, ignore_eos: true,
  })).choices[0].text;
  const at = greedy.search(/[ -~]{2}/);
  check(at > 0, `an ASCII pair in the greedy text ${JSON.stringify(greedy)}`);
  const stop = greedy.slice(at, at + 2);
  let stopped = '';
  let stopFinish = null;
  const stopStream = await client.completions.create({
    model: baseModel, prompt: 'Once upon', max_tokens: 48, temperature: 0, ignore_eos: true,
    stop: [stop], stream: true,
  });
  for await (const chunk of stopStream) {
    stopped += chunk.choices[0].text;
    if (chunk.choices[0].finish_reason) stopFinish = chunk.choices[0].finish_reason;
  }
  check(stopped === greedy.slice(0, greedy.indexOf(stop)) && stopFinish === 'stop',
        `stop ${JSON.stringify(stop)} mid-stream`);

  // echo with logprobs, as lm-eval's local-completions scores a continuation: the prompt's
  // tokens come back first (the first without a logprob), then the generated one.
  const scored = await client.completions.create({
    model: adapter, prompt: 'Paris is', max_tokens: 1, temperature: 0, logprobs: 1, echo: true,
  });
  const lp = scored.choices[0].logprobs;
  check(scored.choices[0].text.startsWith('Paris is') && lp.token_logprobs[0] === null &&
        lp.tokens.length >= 3 && lp.token_logprobs.slice(1).every((x) => x <= 0) &&
        lp.top_logprobs.length === lp.tokens.length,
        `echo with logprobs ${JSON.stringify(lp).slice(0, 200)}`);

  // logit_bias: +100 on one token id makes every greedy token that one.
  const biased = await client.completions.create({
    model: baseModel, prompt: 'x', max_tokens: 3, temperature: 0, logit_bias: { 66: 100 },
  });
  check(biased.choices[0].text === 'BBB', `logit_bias ${JSON.stringify(biased.choices[0].text)}`);

  // Every other parameter, OpenAI's and moleserve's extensions (passed in the body, as vLLM's
  // extra fields are): accepted, and the routing trace comes back per token.
  const full = await client.completions.create({
    model: adapter, prompt: 'All the knobs', max_tokens: 5, temperature: 0.7, top_p: 0.9,
    seed: 4, frequency_penalty: 0.5, presence_penalty: 0.3, user: 'client-test', top_k: 20,
    min_p: 0.01, repetition_penalty: 1.1, stop_token_ids: [259], priority: 1, ignore_eos: true,
    routing: { algorithm: 'topk', k: 1 }, return_routing: true,
  });
  const routed = full.choices[0].routing;
  check(full.choices.length === 1 && Array.isArray(routed) && routed.length === 5 &&
        routed.every((t) => t.length > 0 && t.every((site) => site.experts.length === 1)),
        `every parameter, top-1 routing override and its trace (${JSON.stringify(routed).slice(0, 120)})`);
  await expectError(client.completions.create({
    model: adapter, prompt: 'x', routing: { algorithm: 'topk', k: 99 },
  }), OpenAI.BadRequestError, 400, 'routing', 'routing override that does not fit the adapter');

  // Errors come back as the SDK's typed errors.
  await expectError(client.completions.create({ model: 'nope', prompt: 'x' }),
                    OpenAI.NotFoundError, 404, 'model', 'unknown model');
  await expectError(client.completions.create({ model: baseModel, prompt: 'x', temperature: 5 }),
                    OpenAI.BadRequestError, 400, 'temperature', 'temperature out of range');
  await expectError(client.chat.completions.create({ model: baseModel, messages: [] }),
                    OpenAI.BadRequestError, 400, 'messages', 'empty messages');

  // Aborting a stream mid-way: the server keeps serving.
  const controller = new AbortController();
  const long = await client.completions.create(
    { model: adapter, prompt: 'Go on', max_tokens: 500, ignore_eos: true, stream: true },
    { signal: controller.signal });
  let chunks = 0;
  try {
    for await (const chunk of long) {
      if (++chunks === 2) controller.abort();
    }
  } catch (e) {
    // the SDK reports the abort
  }
  const after = await client.completions.create({ model: baseModel, prompt: 'x', max_tokens: 2 });
  check(chunks >= 2 && after.choices.length === 1, 'abort mid-stream, then served again');
  // The abort cancelled the request in the engine: the server's metrics (also served on the API
  // port) count one cancelled HTTP request.
  const metricsURL = baseURL.replace(/\/v1\/?$/, '/metrics');
  let cancelled = 0;
  for (let i = 0; i < 100 && cancelled === 0; i++) {
    const text = await (await fetch(metricsURL)).text();
    const m = text.match(/^moleserve_requests_finished_total\{[^}]*(?:outcome="cancelled"[^}]*protocol="http"|protocol="http"[^}]*outcome="cancelled")[^}]*\} (\S+)$/m);
    cancelled = m ? Number(m[1]) : 0;
    if (cancelled === 0) await new Promise((r) => setTimeout(r, 50));
  }
  check(cancelled === 1, `the aborted stream counts as cancelled in /metrics (${cancelled})`);

  console.log(failed === 0 ? 'all passed' : `${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main().catch((e) => {
  console.error(`FAIL unexpected: ${e.stack || e}`);
  process.exit(1);
});
