"""Self-generated training data for EAGLE-3: the target answers prompts, and its features are kept as it decodes.

A draft head is judged by agreement with the target, so the closest data to what it will draft is the target's own
output. transformers' batched `generate` (left padding) decodes B prompts at a time; `output_hidden_states` returns
every layer's states at every step and `output_logits` the raw next-token logits, so the features of the answer are
captured during generation, no second forward. In HF's convention hidden_states[i] is the input of layer i
(0 = embeddings) and hidden_states[L] the final-normed output: EAGLE-3's aux layers index it directly.

Alignment for a prompt of P tokens and an answer a_0..a_{G-1} (ending at the first stop id): step 0 (the prefill)
gives the states of prompt positions 0..P-1 and the logits predicting a_0; step s >= 1 feeds a_{s-1} and gives its
states and the logits predicting a_s. So the stored sequence is prompt + a_0..a_{G-2} (T = P + G - 1 positions, each
with its features), and position t's target distribution is the logits that predict token t + 1 (for t >= P - 1).
Prompt positions before P - 1 have no logits: their 'distribution' is the next prompt token with probability 1 and
their loss mask is 0 (the head drafts answers, not prompts).

Prompts (offline): ShareGPT first user turns from the records before data.SHAREGPT_EVAL_FROM (the rest is
evaluation-only), and Python completion prompts cut from the standard library's own source (the target is a coder
model). Each batch is decoded greedily or sampled at `temperature`, alternately.

Shards as data.extract_shards writes them (ids, loss_mask, offsets, hidden, topk_ids, topk_probs) plus
aux [N, 3H] bf16 (data.load_sequences reads both); index.json lists the keys per shard, so a killed run
resumes where it stopped.
"""
from __future__ import annotations

import ast
import json
import random
import sysconfig
import time
import zlib
from pathlib import Path

import torch

CODE_ASK = "Complete the following Python code. Reply with the code only.\n\n```python\n{snippet}\n```"


def held_out(key: str, every: int = 10) -> bool:
    """A fixed held-out split: a key is held out by its CRC, so it stays held out in every later session."""
    return zlib.crc32(key.encode()) % every == 0


def code_prompts(count: int, seed: int = 0, max_lines: int = 40, packages: bool = False) -> list[tuple[str, str]]:
    """(key, prompt) completion tasks from the standard library (and, with `packages`, the installed packages'
    own source after it): a function's signature and docstring (plus up to `max_lines` lines before it), to be
    completed. Skips tests and vendored folders. Keys: 'stdlib:<path>:<function>' or 'site:<path>:<function>'."""
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    if packages:
        roots.append(("site", Path(sysconfig.get_paths()["purelib"])))
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "_vendor", "vendored")
    rng = random.Random(seed)
    files = []
    for label, root in roots:
        found = sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))
        rng.shuffle(found)
        files += [(label, root, path) for path in found]
    prompts = []
    for label, root, path in files:
        if len(prompts) >= count:
            break
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and ast.get_docstring(n)
                 and n.end_lineno - n.lineno >= 6]
        if not funcs:
            continue
        func = rng.choice(funcs)
        body_start = func.body[1].lineno - 1 if len(func.body) > 1 else func.body[0].end_lineno
        snippet = "\n".join(lines[max(0, func.lineno - 1 - max_lines // 2):body_start])
        if 40 < len(snippet) < 4000:
            prompts.append((f"{label}:{path.relative_to(root)}:{func.name}", CODE_ASK.format(snippet=snippet)))
    return prompts


def _stop_ids(hf_model, tokenizer) -> set[int]:
    eos = hf_model.generation_config.eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or [])
    return ids | {tokenizer.eos_token_id}


@torch.inference_mode()
def generate_batch(hf_model, batch: list[list[int]], aux_layers: tuple[int, ...], max_new_tokens: int,
                   temperature: float, pad_id: int, stop_ids: set[int], topk: int = 8) -> list[dict]:
    """One left-padded batch -> a sequence dict per prompt (ids, loss_mask, hidden, aux, topk_ids, topk_probs)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])  # [B, width]
    attention = (torch.arange(width)[None, :] >= torch.tensor([width - len(ids) for ids in batch])[:, None]).long()
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    out = hf_model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                            repetition_penalty=1.0, pad_token_id=pad_id, eos_token_id=sorted(stop_ids),
                            output_hidden_states=True, output_logits=True, return_dict_in_generate=True, **sampling)
    steps = len(out.hidden_states)
    layers = (*aux_layers, len(out.hidden_states[0]) - 1)  # the aux layers, then the final-normed output
    # states[l]: [B, width + steps - 1, H] for each kept layer; logits: [B, steps, V] (float32, before sampling)
    states = [torch.cat([out.hidden_states[s][l] for s in range(steps)], dim=1) for l in layers]
    logits = torch.stack(out.logits, dim=1)
    answers = out.sequences[:, width:].tolist()
    rows = []
    for b, prompt in enumerate(batch):
        answer = []
        for token in answers[b]:
            answer.append(token)
            if token in stop_ids:
                break
        P, G = len(prompt), len(answer)
        if G < 2:
            continue
        lo, hi = width - P, width + G - 1  # this row's positions in the padded time axis
        probs, top = logits[b, :G].softmax(-1).topk(topk, dim=-1)  # predict a_0..a_{G-1}: positions P-1..T-1
        head_ids = torch.tensor(prompt[1:], dtype=torch.long)[:, None]  # positions 0..P-2: the next prompt token
        first = torch.zeros(P - 1, topk)
        first[:, 0] = 1.0
        rows.append({
            "ids": torch.tensor(prompt + answer[:-1], dtype=torch.int32),
            "loss_mask": torch.tensor([0] * P + [1] * (G - 1), dtype=torch.uint8),
            "aux": torch.cat([s[b, lo:hi] for s in states[:-1]], dim=-1).to(torch.bfloat16),
            "hidden": states[-1][b, lo:hi].to(torch.bfloat16),
            "topk_ids": torch.cat([head_ids.expand(-1, topk), top]).to(torch.int32),
            "topk_probs": torch.cat([first, probs]).to(torch.float16),
            "text_tokens": G, "b": b})
    return rows


def rows_to_shard(rows: list[dict]) -> dict[str, torch.Tensor]:
    """generate_batch rows -> the tensors of one shard (data.py's format, aux included)."""
    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + row["ids"].shape[0])
    tensors = {name: torch.cat([row[name] for row in rows]).contiguous()
               for name in ("ids", "loss_mask", "aux", "hidden", "topk_ids", "topk_probs")}
    tensors["offsets"] = torch.tensor(offsets, dtype=torch.int64)
    return tensors


def generate_shards(hf_model, tokenizer, prompts: list[tuple[str, str]], work_dir: Path, aux_layers: tuple[int, ...],
                    batch_size: int = 16, max_prompt_tokens: int = 320, max_new_tokens: int = 256,
                    temperature: float = 0.7, deadline: float | None = None, log=print) -> list[Path]:
    """Answer `prompts` [(key, user text)] with the target and store the features (module docstring).

    Resumable by key (index.json); batches of similar prompt length; even batches greedy, odd ones sampled at
    `temperature` (the key records which: '<key>#greedy' or '<key>#t0.7'). Stops starting batches after `deadline`.
    """
    from tqdm import tqdm

    from .data import write_shard

    work_dir.mkdir(parents=True, exist_ok=True)
    index_path = work_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    done = {key.split("#")[0] for keys in index.values() for key in keys}
    todo = []
    for key, text in prompts:
        if key in done:
            continue
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if len(ids) <= max_prompt_tokens:
            todo.append((key, ids))
    todo.sort(key=lambda item: len(item[1]))  # similar lengths per batch: less padding
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    random.Random(len(index)).shuffle(batches)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_ids(hf_model, tokenizer)
    new_tokens, start = 0, time.time()
    bar = tqdm(total=len(batches), desc="generate", unit="batch")
    for number, batch in enumerate(batches):
        if deadline is not None and time.time() > deadline:
            log(f"generation deadline reached ({number} of {len(batches)} batches)")
            break
        temperature_b = temperature if (len(index) % 2) else 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(len(index))
            rows = generate_batch(hf_model, [ids for _, ids in batch], aux_layers, max_new_tokens, temperature_b,
                                  pad_id, stop_ids)
        tag = "greedy" if temperature_b == 0 else f"t{temperature_b:g}"
        keys = [f"{batch[row['b']][0]}#{tag}" for row in rows]
        if rows:
            write_shard(work_dir, index, keys, rows_to_shard(rows))
        new_tokens += sum(row["text_tokens"] for row in rows)
        bar.update(1)
        bar.set_postfix(new_tok_s=f"{new_tokens / (time.time() - start):.0f}")
    bar.close()
    return [work_dir / name for name in index]


def training_prompts(sharegpt: int, code: int, seed: int = 0) -> list[tuple[str, str]]:
    """`sharegpt` first user turns (category-balanced, records before SHAREGPT_EVAL_FROM) and `code` standard
    library completions, interleaved so that a run cut short by its deadline still has both."""
    from .data import sample_conversations

    chat = [(f"sharegpt:{key}", messages[0]["content"]) for key, messages in
            sample_conversations(sharegpt, skip_ids=set(), seed=seed)]
    completions = code_prompts(code, seed=seed)
    mixed, rng = chat + completions, random.Random(seed)
    rng.shuffle(mixed)
    return mixed


def build_shards(loaded, target, work: Path, aux_layers: tuple[int, ...], *, generate: int, code: int,
                sharegpt: int, generate_minutes: float, extract_minutes: float, batch_size: int = 16,
                max_new_tokens: int = 256, temperature: float = 0.7, max_tokens: int = 512, seed: int = 0,
                log=print) -> list[Path]:
    """Every training shard in `work` (EAGLE-2 and EAGLE-3 features both), after adding what the budgets allow:
    the target's own answers to `generate` ShareGPT prompts and `code` standard-library completions
    (work/generated), then `sharegpt` ShareGPT conversations as written, forward only (work/sharegpt_text; a
    different draw, seed + 1). Both resume."""
    from . import data

    start = time.time()
    shards = generate_shards(loaded.hf_model, loaded.tokenizer, training_prompts(generate, code, seed),
                             work / "generated", aux_layers, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             temperature=temperature, deadline=start + generate_minutes * 60, log=log)
    convs = data.sample_conversations(sharegpt, skip_ids=set(), seed=seed + 1)
    items = [(f"text:{key}", *data.render(loaded.tokenizer, messages, max_tokens)) for key, messages in convs]
    shards += data.extract_shards(target, items, work / "sharegpt_text", shard_size=32, aux_layers=aux_layers,
                                  deadline=time.time() + extract_minutes * 60, log=log)
    return shards
