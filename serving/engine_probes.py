"""The evaluation's chat generator on a vLLM engine of the probe replica's own.

`EngineChatGenerator` is `safety_eval.generation.ChatGenerator` over a vLLM `AsyncLLM` that
carries the routing worker extension (`serving.routing_worker.RoutingRecorder`):

- `generate`: greedy answers, encoded and decoded exactly as `HFChatGenerator` does (the chat
  template's ids, no special tokens added; cut at the end-of-sequence token), so the judge sees
  the same kind of text from either engine;
- `attacked(attack)`: an expert mask or routing scale of `safety_eval.attacks`, applied inside
  this engine by the worker extension (`routing_set_attack`) and removed on exit;
- `profile(prompts)`: each prompt's routing, counted by the extension on its prompt tokens
  (one generated token each), as `moe_routing.stats.RoutingCounts`;
- `routed_generate` / `routing_snapshot`: answers with each request's routing counts, and the
  engine's cumulative counts (tests, benchmarks).

The engine runs eager unless `compiled` (the worker installs its hooks before vLLM compiles the
model: `serving.routing_worker.configure_engine`).

The suite's forced-route searches (layer route search, F-SOUR) need a transformers model; the
probe replica loads one only when they are asked for.

The engine runs on an event loop in another thread than the caller's (the Serve replica's loop,
or a loop of its own for `start`), since the suite is synchronous code run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from moe_routing.chat import chat_prompt_ids
from serving.routing_worker import TRACK_MARKER, configure_engine, engine_environment

# A probe engine: eager unless asked (a compiled engine's start costs a compilation, ~40 s more
# on the CPU organism, for a suite of a few minutes), no prefix cache (a cached prompt token would
# not be routed, and the identification profile counts every prompt token), the model's own
# context length (jailbreak templates are long), float32 as the transformers probes on a CPU.
PROBE_ENGINE = {
    "enable_prefix_caching": False,
    "gpu_memory_utilization": 0.15,
    "seed": 0,
    "dtype": "float32",
}
PROFILE_CHUNK = 512  # prompts profiled at once (the worker tracks MAX_TRACKED_REQUESTS)


@dataclass(frozen=True)
class EngineShape:
    """What the suite reads off a model: its architecture and routing shape."""

    architecture: str
    num_layers: int
    num_experts: int
    top_k: int


class EngineChatGenerator:
    engine_name = "vllm"

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, shape: EngineShape):
        self.engine, self.loop, self.shape = engine, loop, shape
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = engine.model_config.max_model_len
        self._own_loop: threading.Thread | None = None

    @classmethod
    async def create(cls, checkpoint: str, *, engine_options: dict | None = None,
                     compiled: bool = False) -> EngineChatGenerator:
        """An engine for `checkpoint` on the running loop; the generator's methods are then
        called from other threads (the suite runs in a worker thread). `compiled`: vLLM's
        compiled engine with the hooks installed before compilation (else eager)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from moe_routing.architectures import check_supported

        options = PROBE_ENGINE | (engine_options or {})
        if compiled and options.get("enforce_eager"):
            raise ValueError("a compiled probe engine cannot have enforce_eager: true")
        args = AsyncEngineArgs(model=checkpoint, **options)
        configure_engine(args, compiled=compiled)

        def build() -> AsyncLLM:
            with engine_environment(compiled):
                return AsyncLLM.from_engine_args(args)

        # Starting an engine blocks for tens of seconds. Off the loop, which on the probe replica
        # must go on answering status and health calls meanwhile (vLLM starts the engine's loop
        # tasks at first use when it is built outside a running loop).
        engine = await asyncio.to_thread(build)
        shape = (await engine.collective_rpc("routing_install"))[0]
        architecture = check_supported(engine.model_config.hf_config)
        shape = EngineShape(architecture, shape["num_layers"], shape["num_experts"], shape["top_k"])
        return cls(engine, asyncio.get_running_loop(), shape)

    @classmethod
    def start(cls, checkpoint: str, *, engine_options: dict | None = None,
              compiled: bool = False) -> EngineChatGenerator:
        """An engine on an event loop in a thread of its own (scripts, benchmarks, tests)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="probe-engine-loop", daemon=True)
        thread.start()
        generator = asyncio.run_coroutine_threadsafe(
            cls.create(checkpoint, engine_options=engine_options, compiled=compiled), loop).result()
        generator._own_loop = thread
        return generator

    def close(self) -> None:
        engine, self.engine = self.engine, None
        handler = getattr(engine, "output_handler", None)
        if handler is not None:  # first, or it logs the engine's exit as an error
            self.loop.call_soon_threadsafe(handler.cancel)
        engine.shutdown()
        if self._own_loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._own_loop.join(timeout=10)

    def _call(self, coroutine):
        """Run a coroutine on the engine's loop from this (another) thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def _prompt_ids(self, prompt: str, room: int) -> list[int]:
        ids = chat_prompt_ids(self.tokenizer, prompt)
        if len(ids) + room > self.max_model_len:
            raise ValueError(f"a prompt of {len(ids)} tokens plus {room} new ones exceeds the probe "
                             f"engine's max_model_len {self.max_model_len}")
        return ids

    async def _one(self, ids: list[int], params, key: str):
        final = None
        async for output in self.engine.generate({"prompt_token_ids": ids}, params, key):
            final = output
        return final

    def _run(self, prompts: Sequence[str], params, tracked: bool):
        keys = [(TRACK_MARKER if tracked else "probe-") + uuid.uuid4().hex for _ in prompts]
        room = params.max_tokens

        async def run_all():
            ids = [self._prompt_ids(p, room) for p in prompts]
            return await asyncio.gather(*(self._one(i, params, k) for i, k in zip(ids, keys)))

        return keys, self._call(run_all())

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 32) -> list[str]:
        """Greedy answers in prompt order."""
        from vllm import SamplingParams

        if max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
        _, outputs = self._run(prompts, params, tracked=False)
        eos = self.tokenizer.eos_token_id
        answers = []
        for output in outputs:
            tokens = list(output.outputs[0].token_ids)
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            answers.append(self.tokenizer.decode(tokens, skip_special_tokens=True).strip())
        return answers

    def routed_generate(self, prompts: Sequence[str], *,
                        max_new_tokens: int = 32) -> list[tuple[list[int], dict]]:
        """Greedy generation with each request's routing: per prompt, the generated token ids
        and the worker's counts {"prompt": [L][E], "generated": [L][E]}."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
        keys, outputs = self._run(prompts, params, tracked=True)
        counts = self._call(self.engine.collective_rpc("routing_pop_requests", args=(keys,)))[0]
        if any(c is None for c in counts):
            raise RuntimeError("the engine kept no routing for some of the requests")
        return [(list(o.outputs[0].token_ids), c) for o, c in zip(outputs, counts)]

    def routing_snapshot(self) -> dict:
        """The worker's cumulative counts: hits [2][L][E] (prompt, generated) and token totals."""
        return self._call(self.engine.collective_rpc("routing_snapshot"))[0]

    @contextlib.contextmanager
    def attacked(self, attack):
        """`attack` (an `ExpertMask` or `RoutingScale`) applied inside the engine meanwhile."""
        self._call(self.engine.collective_rpc("routing_set_attack", args=(attack.to_dict(),)))
        try:
            yield
        finally:
            self._call(self.engine.collective_rpc("routing_set_attack", args=(None,)))

    def profile(self, prompts: Sequence[str]):
        """RoutingCounts of the prompts' chat turns (their prompt tokens), in prompt order."""
        from vllm import SamplingParams

        from serving.telemetry import counts_from_requests

        params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
        hits = []
        for start in range(0, len(prompts), PROFILE_CHUNK):  # within the worker's tracking slots
            keys, _ = self._run(prompts[start : start + PROFILE_CHUNK], params, tracked=True)
            hits += self._call(self.engine.collective_rpc("routing_pop_requests", args=(keys,)))[0]
        missing = sum(h is None for h in hits)
        if missing:
            raise RuntimeError(f"the engine kept no routing for {missing} of {len(hits)} profiled prompts")
        return counts_from_requests([h["prompt"] for h in hits], self.shape.top_k)

    def profile_safety(self, harmful: Sequence[str], benign: Sequence[str]):
        from safety_eval.attacks import SafetyProfile

        return SafetyProfile(self.profile(harmful), self.profile(benign))
