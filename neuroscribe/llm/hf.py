"""The ``hf`` LLM backend: a local transformers causal LM, one request at a time."""

from __future__ import annotations

import asyncio
import threading

from neuroscribe.llm.client import LLMConfig, Request, Response
from neuroscribe.simulate.value_read import HFLM, read_request


class HFBackend:
    """A local transformers causal LM (chat template when the tokenizer has one)."""

    name = "hf"
    reads_values = True
    stoppable = False

    def __init__(self, cfg: LLMConfig) -> None:
        from neuroscribe.models import load_subject

        self.model = cfg.llm_model
        self.subject = load_subject(cfg.llm_model)
        self.lm = HFLM(self.subject.model)  # the KV cache of value reading
        self.lock = threading.Lock()  # one call at a time, in a thread

    def _read_values(self, req: Request) -> Response:
        def encode(s: str) -> list[int]:
            return self.subject.tokenizer(s, add_special_tokens=False).input_ids

        probs, n = read_request(self.lm, encode, self.lm.ids, req.segments, req.values, req.fill)
        return Response(text="", prompt_tokens=n, value_probs=probs)

    def _run(self, req: Request) -> Response:
        import torch

        tok, model = self.subject.tokenizer, self.subject.model
        if req.segments:
            with self.lock:
                return self._read_values(req)
        if req.messages and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": r, "content": c} for r, c in req.messages],
                                          add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            text = req.prompt or "\n\n".join(c for _, c in req.messages)
            ids = tok(text, return_tensors="pt").input_ids
        with self.lock, torch.inference_mode():
            torch.manual_seed(req.seed)
            if req.prompt_logprobs:
                logits = model(ids).logits[0].float().log_softmax(-1)
                tops: list[dict[str, float]] = [{}]
                for row in logits[:-1]:
                    v, i = row.topk(req.prompt_logprobs)
                    tops.append({tok.decode([int(j)]): float(x) for x, j in zip(v, i)})
                return Response(text="", prompt_tokens=ids.shape[1],
                                tokens=[tok.decode([int(t)]) for t in ids[0]], top_logprobs=tops)
            out = model.generate(ids, max_new_tokens=req.max_tokens,
                                 do_sample=req.temperature > 0,
                                 temperature=req.temperature or None,
                                 pad_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:]
        text = tok.decode(new, skip_special_tokens=True)
        for s in req.stop:
            text = text.split(s)[0]
        return Response(text=text, prompt_tokens=ids.shape[1], completion_tokens=len(new))

    async def complete(self, req: Request) -> Response:
        return await asyncio.to_thread(self._run, req)
