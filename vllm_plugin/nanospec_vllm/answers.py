"""The target answers head-training prompts in vLLM: many requests in flight, so it decodes several times faster
than transformers' `generate` on the same CPU (nanospec_core/training/answers.py has the figures and the format).

    .venv-vllm/bin/python -m nanospec_vllm answers --model ~/.cache/nanospec/models/qwen2.5-coder-0.5b-instruct \
        --prompts runs/stage2/prompts.jsonl --out runs/stage2/answers.jsonl --minutes 80

Prompts arrive as token ids (the project's own chat template), so nothing is re-templated here. Each prompt is decoded
at its own temperature (0 = greedy; sampling draws from the engine's seeded generator), in chunks; every chunk is appended to the answers file
as soon as it ends, and a restarted run skips keys already there.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed run
                continue
    return records


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out = Path(args.out)
    done = {record["key"] for record in read_jsonl(out)}
    todo = [record for record in read_jsonl(Path(args.prompts)) if record["key"] not in done]
    print(f"{len(done)} answered already, {len(todo)} to go", flush=True)
    if not todo:
        return 0
    import vllm

    engine = f"vllm {vllm.__version__}"
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.in_flight,
              seed=0, enforce_eager=args.eager)
    deadline = time.time() + args.minutes * 60
    started, new_tokens = time.time(), 0
    bar = tqdm(total=len(todo), desc="answers", unit="prompt")
    for first in range(0, len(todo), args.chunk):
        if time.time() > deadline:
            print(f"deadline reached: {first} of {len(todo)} answered this run", flush=True)
            break
        chunk = todo[first:first + args.chunk]
        # no per-request seed: vLLM 0.32's CPU sampler cannot rewind a seeded generator after a partial prefill
        params = [SamplingParams(temperature=r["temperature"], top_p=1.0, top_k=-1, max_tokens=args.max_new_tokens)
                  for r in chunk]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in chunk], params,
                               use_tqdm=False)
        with out.open("a") as sink:
            for record, output in zip(chunk, outputs):
                answer = list(output.outputs[0].token_ids)
                new_tokens += len(answer)
                sink.write(json.dumps({**record, "answer_ids": answer, "engine": engine, "dtype": args.dtype},
                                      ensure_ascii=False) + "\n")
        bar.update(len(chunk))
        bar.set_postfix(new_tok_s=f"{new_tokens / (time.time() - started):.0f}")
    bar.close()
    print(f"{new_tokens} new tokens in {time.time() - started:.0f} s", flush=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the target's HF-format folder (the project's model cache)")
    parser.add_argument("--prompts", required=True, help="from `python -m nanospec_core head-prompts`")
    parser.add_argument("--out", required=True, help="answers file (JSON lines, appended to)")
    parser.add_argument("--minutes", type=float, default=60.0, help="no new chunk starts after this")
    parser.add_argument("--in-flight", type=int, default=128, help="requests decoded together (max_num_seqs)")
    parser.add_argument("--chunk", type=int, default=384, help="prompts per call; the file grows per call")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=3072, help="prompt + answer (long-context items: 2048 + 1024)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eager", action="store_true", help="skip torch.compile (faster start, slower decode)")
