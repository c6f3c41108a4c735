"""Greedy chat completions from the real vLLM engine, as JSON on stdout (run as a subprocess:
vLLM starts worker processes, so it needs its own __main__)."""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    checkpoint, prompts_path = sys.argv[1], sys.argv[2]
    prompts = json.loads(open(prompts_path).read())
    llm = LLM(model=checkpoint, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
              max_model_len=1024, seed=0)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                       SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    print("VLLM_OUTPUTS " + json.dumps([o.outputs[0].text for o in outputs]))
