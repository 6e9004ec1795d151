"""The target answers a stage's prompts with transformers' batched `generate`: the engine where vLLM is not installed.

On a GPU this is the fast path of scripts/gpu_head_stage.sh (a 0.5B target decodes thousands of tokens per second at
batch 64); on a CPU vLLM's continuous batching is 3-4x faster (training/answers.py). Same files as
`nanospec_vllm answers`: it reads head-prompts' JSON lines and appends {**prompt record, answer_ids, engine, dtype}
per finished batch, skipping keys already answered, so it resumes and feeds `head-data pack` unchanged.

Batches hold prompts of similar length (less left padding) and one sampler each: greedy prompts together, sampled
ones together at their temperature (seeded per batch).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .corpus import read_jsonl


def batches(records: list[dict], size: int) -> list[list[dict]]:
    """Same-temperature batches of similar prompt length."""
    ordered = sorted(records, key=lambda r: (r["temperature"], len(r["prompt_ids"])))
    out = []
    for start in range(0, len(ordered), size):
        group = ordered[start:start + size]
        for temperature in dict.fromkeys(r["temperature"] for r in group):
            out.append([r for r in group if r["temperature"] == temperature])
    return out


@torch.inference_mode()
def answer_batch(hf_model, batch: list[dict], pad_id: int, stop_ids: set[int], max_new_tokens: int,
                 seed: int) -> list[list[int]]:
    """Left-padded generate; each answer cut after its first stop id (kept, as vLLM keeps it)."""
    width = max(len(r["prompt_ids"]) for r in batch)
    device = hf_model.device
    ids = torch.tensor([[pad_id] * (width - len(r["prompt_ids"])) + r["prompt_ids"] for r in batch], device=device)
    pads = torch.tensor([width - len(r["prompt_ids"]) for r in batch], device=device)
    attention = torch.arange(width, device=device)[None, :] >= pads[:, None]  # [B, width]: False on left padding
    temperature = batch[0]["temperature"]
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    out = hf_model.generate(input_ids=ids, attention_mask=attention.long(), max_new_tokens=max_new_tokens,
                            pad_token_id=pad_id, eos_token_id=sorted(stop_ids), repetition_penalty=1.0, **sampling)
    answers = []
    for row in out[:, width:].tolist():
        answer = []
        for token in row:
            answer.append(token)
            if token in stop_ids:
                break
        answers.append(answer)
    return answers


def run(hf_model, tokenizer, prompts: Path, out: Path, stop_ids: set[int], batch_size: int = 64,
        max_new_tokens: int = 1024, minutes: float = 60.0, log=print) -> int:
    """Answer every prompt not yet in `out` until the deadline; returns answers written this call."""
    done = {r["key"] for r in read_jsonl(out)} if Path(out).is_file() else set()
    todo = [r for r in read_jsonl(prompts) if r["key"] not in done]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = f"transformers generate ({hf_model.device.type})"
    dtype = str(hf_model.dtype).removeprefix("torch.")
    deadline, written, tokens, start = time.time() + minutes * 60, 0, 0, time.time()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for number, batch in enumerate(batches(todo, batch_size)):
        if time.time() > deadline:
            break
        answers = answer_batch(hf_model, batch, pad_id, stop_ids, max_new_tokens, seed=number)
        with Path(out).open("a") as sink:
            for record, answer in zip(batch, answers):
                sink.write(json.dumps({**record, "answer_ids": answer, "engine": engine, "dtype": dtype},
                                      ensure_ascii=False) + "\n")
        written += len(batch)
        tokens += sum(map(len, answers))
        log(f"{written}/{len(todo)} answered, {tokens / (time.time() - start):.0f} new tok/s")
    return written
