"""The baselines without a draft: our KV-cached autoregressive loop (`vanilla`) and transformers' `generate` (`hf`,
`hf-lookup`), each a generator of StepStats so every method reports the same way.

vanilla is gpt-fast's decode_one_token loop: one target forward per token, logits of the last row only.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..metrics import StepStats
from ..models.target import TargetModel
from .request import Clock, Request, choose, clip_tokens


def plain_decode(target: TargetModel, request: Request) -> Iterator[StepStats]:
    """Yield round 0 (prefill + first token), then one StepStats per generated token."""
    clock, device = Clock(target.device), target.device
    generator = request.generator(device)
    prompt = request.prompt_ids.to(device)
    cache = target.new_cache(prompt.numel() + request.gen.max_new_tokens + 1)
    t0 = clock()
    hidden = target.forward(prompt, cache).hidden[-1:]
    cache.commit()
    token = choose(target.logits(hidden)[0], request, generator)
    tokens, done = clip_tokens([token], 0, request)
    produced = len(tokens)
    yield StepStats(round=0, tokens=tokens, accepted=len(tokens), prefill_ms=(clock() - t0) * 1e3, finished=done)
    step = 0
    while not done:
        step += 1
        t0 = clock()
        hidden = target.forward(torch.tensor([token], device=device), cache).hidden
        cache.commit()
        token = choose(target.logits(hidden)[0], request, generator)
        tokens, done = clip_tokens([token], produced, request)
        produced += len(tokens)
        yield StepStats(round=step, tokens=tokens, accepted=len(tokens), verify_ms=(clock() - t0) * 1e3,
                        finished=done)


def hf_generate(hf_model, request: Request, prompt_lookup: int = 0) -> Iterator[StepStats]:
    """transformers `generate` as users run it; prompt_lookup > 0 enables prompt-lookup decoding (training-free).

    Every setting is explicit: transformers fills what is left unset from the model's own generation_config (a hub
    model's repetition penalty, top-k, top-p, ...), which would make this baseline decode a different distribution
    from every other method. The seed goes into a forked RNG state, so a shared server's global RNG is untouched.
    Yields one StepStats with all tokens.
    """
    from transformers import GenerationConfig as HFGenerationConfig

    clock = Clock(hf_model.device)
    sampling = request.gen.temperature > 0
    config = HFGenerationConfig(
        max_new_tokens=request.gen.max_new_tokens, do_sample=sampling, num_beams=1,
        eos_token_id=sorted(request.stop_ids) if request.gen.stop_on_eos and request.stop_ids else None,
        pad_token_id=hf_model.config.pad_token_id if hf_model.config.pad_token_id is not None
        else hf_model.config.eos_token_id,
        prompt_lookup_num_tokens=prompt_lookup or None,
        temperature=request.gen.temperature if sampling else 1.0, top_k=0 if sampling else None,
        top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        length_penalty=1.0, min_new_tokens=0, bad_words_ids=None, suppress_tokens=None,
        begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
    )
    ids = request.prompt_ids.to(hf_model.device).unsqueeze(0)
    devices = [hf_model.device] if hf_model.device.type == "cuda" else []
    t0 = clock()
    with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=sampling):
        if sampling:
            torch.manual_seed(request.gen.seed)
        output = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    elapsed = clock() - t0
    tokens, done = clip_tokens(output[0, ids.shape[1]:].tolist(), 0, request)
    yield StepStats(round=0, tokens=tokens, accepted=len(tokens), prefill_ms=elapsed * 1e3, finished=True)
