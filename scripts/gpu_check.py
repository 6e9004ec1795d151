"""The prepared GPU check (issue 13): the CUDA tests, then EAGLE vs NanoSpec on a random-weight model of the
embedded target's shape (Qwen2.5-Coder-0.5B: no packaged weights needed), bf16, greedy, on the GPU.

    bash scripts/gpu_check.sh          # from a bare checkout; writes $OUT/gpu_check.md when OUT is set
Random weights accept few drafts, so the figures that mean something are the draft time split and the
NanoSpec / EAGLE draft-time ratio, not tokens per round.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanospec_core.config import GenerationConfig, TreeConfig, VocabConfig  # noqa: E402
from nanospec_core.decoding.engine import speculative_decode  # noqa: E402
from nanospec_core.decoding.request import Request  # noqa: E402
from nanospec_core.metrics import summarize  # noqa: E402
from nanospec_core.models.eagle import random_head  # noqa: E402
from nanospec_core.models.target import TargetModel  # noqa: E402
from nanospec_core.vocab.policies import make_policy  # noqa: E402

EMBEDDED_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1000000.0, tie_word_embeddings=True)


def main() -> int:
    import transformers

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**EMBEDDED_SHAPE)).to("cuda", torch.bfloat16)
    target = TargetModel(model.eval().requires_grad_(False))
    head = random_head(target, "eagle2", seed=0)
    prompt = torch.randint(100, 150000, (200,), device="cuda")
    gen = GenerationConfig(max_new_tokens=128, stop_on_eos=False)
    tree = TreeConfig(depth=6, top_k=10, total_tokens=60)  # the GPU preset
    lines = [f"# GPU check: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
             f"random Qwen2.5-0.5B shape, bf16, tree {tree.depth}/{tree.top_k}/{tree.total_tokens}", "",
             "| method | tok/s | tau | draft ms/round | lm head ms | backbone ms | gather ms | verify ms | active |",
             "|---|---|---|---|---|---|---|---|---|"]
    outputs = {}
    for method, policy_name in (("eagle", "full"), ("nanospec", "nanospec"), ("eagle", "full"),
                                ("nanospec", "nanospec")):  # each twice: the first run warms the kernels up
        policy = make_policy(policy_name, head.lm_head_weight, VocabConfig(), target.vocab_size,
                             frequency=torch.randperm(target.vocab_size, device="cuda"))
        torch.cuda.synchronize()
        start = time.perf_counter()
        steps = list(speculative_decode(target, head, policy, Request(prompt, gen, frozenset()), tree))
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        outputs.setdefault(method, []).append([t for s in steps for t in s.tokens])
        s = summarize(steps, wall)
        rounds = [x for x in steps if x.round > 0]
        mean = lambda key: sum(getattr(x, key) for x in rounds) / max(len(rounds), 1)  # noqa: E731
        row = (f"| {method} | {s.tokens_per_s:.1f} | {s.mean_accepted:.2f} | {mean('draft_ms'):.2f} | "
               f"{mean('lm_head_ms'):.2f} | {mean('backbone_ms'):.2f} | {mean('gather_ms'):.2f} | "
               f"{mean('verify_ms'):.2f} | {mean('active_vocab'):.0f} |")
        if len(outputs[method]) == 2:
            lines.append(row)
    same = outputs["eagle"][1] == outputs["nanospec"][1]
    lines += ["", f"greedy outputs identical (EAGLE vs NanoSpec, bf16): {same}"]
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
