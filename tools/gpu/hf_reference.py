#!/usr/bin/env python3
"""Reference logits from Hugging Face transformers' own LlamaForCausalLM (run on the GPU host,
whose Python has transformers; see ../shared/GPU.md).

  hf_reference.py MODEL_DIR > tests/fixtures/demo_model_hf_logits.json

MODEL_DIR is the demo model written by `moleserve-write-demo`. The model runs in float64 on the
CPU with eager attention, so the fixture's own error is negligible. The prompts are those of
tests/engine/model/llama_model_test.cc (kPrompts).
"""
import json
import sys

import torch
import transformers
from transformers import LlamaForCausalLM

PROMPTS = [
    [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33],
    [256, 1, 2, 3],
    [256, 200, 13, 10, 9, 77, 255, 0, 128, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74],
]


def main():
    model = LlamaForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float64,
                                             attn_implementation="eager")
    model.eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            logits = model(torch.tensor([p])).logits[0]
            out.append([[round(v, 9) for v in row] for row in logits.tolist()])
    json.dump({"generator": "tools/gpu/hf_reference.py",
               "transformers": transformers.__version__, "torch": torch.__version__,
               "model": "moleserve demo (moleserve-write-demo)", "dtype": "float64",
               "prompts": PROMPTS, "logits": out}, sys.stdout)


if __name__ == "__main__":
    main()
