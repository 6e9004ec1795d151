"""Correctness on the device: what must hold before any timing means something.

  greedy     NanoSpec (and EAGLE, the static baseline, an EAGLE-3 head) == plain greedy decoding, float32, token for
             token, on a small random model (weights scaled up so argmaxes are clear, as tests/conftest.py does)
  sampling   lossless verification emits the target's distribution: the first token of repeated verification rounds
             against a chi-square bound (the test of tests/test_verify.py, on this device), and a sampled decode is
             reproducible for its seed
  reads      a greedy round reads the device the fixed few times decoding/host.py lists; on CUDA, set_sync_debug_mode
             ("warn") around rounds counts every synchronising call, so a sync outside those reads shows up
"""
from __future__ import annotations

import math
import warnings

import torch

from ...config import GenerationConfig, TreeConfig, VocabConfig
from ...decoding import host
from ...decoding.engine import speculative_decode
from ...decoding.plain import plain_decode
from ...decoding.request import Request
from ...decoding.tree import DraftTree
from ...decoding.verify import verify_sampling
from ...models.eagle import random_head
from ...models.target import TargetModel
from ...vocab.policies import make_policy
from .report import Context, Skip

TINY_VOCAB = 4096
READS_PER_ROUND = {"full": 3, "nanospec": 4, "static": 3}  # decoding/host.py: rerank, verify, stats (+ set update)
TIMING_WAITS = 1  # Spans.resolve waits once per round on the last event (the round's timings)


def tiny_target(device: str, seed: int = 0) -> TargetModel:
    """2 layers, hidden 64, 4,096 ids, float32: the tests' tiny model, on the device."""
    import transformers

    config = transformers.Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # larger weights than the init's 0.02: peaked, varied next-token distributions
            for name, param in model.named_parameters():
                if param.dim() == 2:
                    param.normal_(0, 0.15 if "embed" not in name else 1.0)
    return TargetModel(model.to(device).eval().requires_grad_(False))


def decode(target, head, policy_name: str | None, prompt, gen: GenerationConfig, tree: TreeConfig) -> list[int]:
    request = Request(prompt.to(target.device), gen, frozenset())
    if policy_name is None:
        return [t for s in plain_decode(target, request) for t in s.tokens]
    frequency = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(1)).to(target.device)
    cfg = VocabConfig(capacity=512, static_core=128, static_k=1024)  # the tiny vocabulary's sizes
    policy = make_policy(policy_name, head.lm_head_weight, cfg, target.vocab_size, head_to_target=head.head_to_target,
                         frequency=frequency)
    return [t for s in speculative_decode(target, head, policy, request, tree) for t in s.tokens]


def greedy_section(ctx: Context) -> None:
    target = tiny_target(ctx.device)
    heads = {"eagle2": random_head(target, "eagle2", seed=0), "eagle3": random_head(target, "eagle3", seed=0)}
    gen, tree = GenerationConfig(max_new_tokens=32 if ctx.quick else 64), TreeConfig(depth=4, top_k=4, total_tokens=16)
    cases = [("eagle2", "full"), ("eagle2", "nanospec"), ("eagle2", "static"), ("eagle3", "nanospec")]
    for seed in range(2 if ctx.quick else 4):
        prompt = torch.randint(3, TINY_VOCAB, (12,), generator=torch.Generator().manual_seed(seed))
        plain = decode(target, None, None, prompt, gen, tree)
        for kind, policy in cases:
            got = decode(target, heads[kind], policy, prompt, gen, tree)
            first = next((i for i, (a, b) in enumerate(zip(got, plain)) if a != b), None)
            ctx.check(f"{kind}/{policy} seed {seed} == plain greedy", got == plain,
                      f"{len(got)} tokens" + ("" if first is None else f", first difference at {first}"))


def chi_square_bound(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson statistic and its 1e-4 critical value (Wilson-Hilferty; cells expecting < 5 pooled)."""
    observed, expected = counts.double(), probs.double() * float(counts.sum())
    rare = expected < 5
    if bool(rare.any()):
        observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof, z = expected.numel() - 1, 3.719
    return statistic, dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def sampling_section(ctx: Context) -> None:
    device, vocab, temperature = ctx.device, 16, 0.8
    # a root with three drafted children (one of them with two children): none of them a good draft
    tree = DraftTree(tokens=torch.tensor([1, 2, 3, 0, 4], device=device),
                     parents=torch.tensor([-1, -1, -1, 0, 0], device=device),
                     depths=torch.tensor([1, 1, 1, 2, 2], device=device),
                     scores=-0.1 * torch.arange(1, 6, dtype=torch.float32, device=device))
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3)).to(device)  # bigram logits
    logits = table[torch.cat([torch.tensor([5], device=device), tree.tokens])]  # root token 5
    generator = torch.Generator(device=device).manual_seed(11)
    draws = 1500 if ctx.quick else 4000
    counts = torch.zeros(vocab, dtype=torch.long)
    for _ in range(draws):
        counts[verify_sampling(tree, logits, temperature, generator).tokens[0]] += 1
    statistic, critical = chi_square_bound(counts, torch.softmax(table[5].double().cpu() / temperature, dim=-1))
    ctx.figure("first-token chi-square", round(statistic, 2))
    ctx.check("sampled first token follows the target's distribution", statistic < critical,
              f"chi2 {statistic:.1f} < {critical:.1f} over {draws} rounds")
    target = tiny_target(device)
    head = random_head(target, "eagle2", seed=0)
    gen = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=7)
    prompt = torch.randint(3, TINY_VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    runs = [decode(target, head, "nanospec", prompt, gen, TreeConfig(depth=4, top_k=4, total_tokens=16))
            for _ in range(2)]
    ctx.check("a sampled NanoSpec decode is reproducible for its seed", runs[0] == runs[1] and len(runs[0]) == 24,
              f"{len(runs[0])} tokens")


def rounds(target, head, policy_name: str, tree: TreeConfig, count: int, sync_debug: bool):
    """(device reads, sync warnings, first warning lines) for rounds 2 .. count + 1 of a greedy request."""
    frequency = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(1)).to(target.device)
    policy = make_policy(policy_name, head.lm_head_weight, VocabConfig(), target.vocab_size, frequency=frequency)
    prompt = torch.randint(3, TINY_VOCAB, (12,), generator=torch.Generator().manual_seed(0)).to(target.device)
    request = Request(prompt, GenerationConfig(max_new_tokens=8 * (count + 2), stop_on_eos=False), frozenset())
    stream = speculative_decode(target, head, policy, request, tree)
    next(stream), next(stream)  # prefill and a first round (lazy initialisation is not a round's cost)
    out = []
    for _ in range(count):
        host.ReadCount.value = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if sync_debug:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                next(stream)
            finally:
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        out.append((host.ReadCount.value, len(syncs), syncs[:3]))
    return out


def reads_section(ctx: Context) -> None:
    target = tiny_target(ctx.device)
    head = random_head(target, "eagle2", seed=0)
    tree = TreeConfig(depth=4, top_k=3, total_tokens=10)
    table = []
    for policy_name, expected in READS_PER_ROUND.items():
        measured = rounds(target, head, policy_name, tree, 3, sync_debug=ctx.cuda)
        reads = [r for r, _, _ in measured]
        ctx.check(f"{policy_name}: {expected} device reads per greedy round", all(r == expected for r in reads),
                  f"reads per round {reads}")
        row = {"policy": policy_name, "reads per round": str(reads)}
        if ctx.cuda:
            syncs = [s for _, s, _ in measured]
            row["sync warnings per round"] = str(syncs)
            extra = [s - r - TIMING_WAITS for r, s, _ in measured]
            ctx.check(f"{policy_name}: no synchronisation besides the reads and the timing wait",
                      all(e <= 0 for e in extra), f"sync warnings {syncs}, reads {reads}; first: "
                      f"{measured[0][2][:2]}")
        table.append(row)
    ctx.figure("reads", table)
    if not ctx.cuda:
        ctx.note("torch.cuda.set_sync_debug_mode: CUDA only (on the CPU every conversion is counted by "
                 "tests/test_host_reads.py instead)")


def require_cuda(ctx: Context, what: str) -> None:
    if not ctx.cuda:
        raise Skip(f"{what}: CUDA only (this run is on {ctx.device})")
