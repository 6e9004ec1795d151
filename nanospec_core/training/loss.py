"""The EAGLE training objective and its held-out measure, on target features from train_data's shards.

Loss (EAGLE, Li et al. 2024; SafeAILab/EAGLE eagle/train/main.py): for position t the head reads (token x_{t+1},
target feature f_t) and predicts f_{t+1};
    loss = SmoothL1(f_hat_{t+1}, f_{t+1}) + 0.1 * CE(target's next-token distribution, softmax(lm_head(f_hat_{t+1}))).
Two deliberate changes for a CPU budget (measurements in train_head's docstring):
  * the CE is a sampled softmax: candidate rows are the target's top-k ids over the sequence plus random negatives;
  * optional unrolled draft levels (EAGLE-3's "training-time test" on the EAGLE-2 architecture): level r reads the
    head's own level r-1 predictions with exactly the visibility it has when drafting (`level_mask`), because a
    head trained only on true features loses most of its accuracy from the second draft level on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class GrowingCache:
    """KVCache stand-in for training: entries are appended by concatenation, never written in place.

    Unrolled draft levels attend to keys an earlier level saved for backward; writing them into one preallocated
    buffer (as KVCache does) would bump its version counter and make autograd refuse the backward pass.
    """

    def __init__(self, num_layers: int):
        self.keys, self.values = [None] * num_layers, [None] * num_layers
        self.length, self.pending, self.max_len = 0, 0, 1 << 30

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer][:, :start], k], dim=1)
            self.values[layer] = torch.cat([self.values[layer][:, :start], v], dim=1)
        return self.keys[layer], self.values[layer]


def level_mask(seq_len: int, level: int, chains: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """tree_mask for unrolled draft level `level` (>= 2) of a sequence whose level 1 saw the true features.

    Level 1 wrote seq_len - 1 entries (index j read (x_{j+1}, f_j)); level r wrote one entry per chain of `chains`
    (sorted level-1 indices, default all) that fits, j < seq_len - r, in the same order. At inference a chain
    drafted from index j sees the verified entries 0..j (true features) and its own earlier levels, nothing else:
    that is this mask. Returns bool [n, pending + n], n = the chains that fit level `level`, pending = level 1's
    seq_len - 1 entries plus the earlier levels' (each level's chains are a prefix of the one before, so a chain's
    own entries sit on the diagonal of each block).
    """
    if chains is None:
        chains = torch.arange(seq_len - 1, device=device)
    fits = [int((chains < seq_len - r).sum()) for r in range(2, level + 1)]
    rows = chains[:fits[-1]][:, None]
    blocks = [torch.arange(seq_len - 1, device=device)[None, :] <= rows]  # level 1: causal prefix 0..j
    blocks += [torch.eye(fits[-1], n, dtype=torch.bool, device=device) for n in fits]  # the chain's own entries
    return torch.cat(blocks, dim=1)


def unrolled(head, ids: torch.Tensor, features: torch.Tensor, levels: int,
             chains: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Predicted features per draft level, as the head drafts them: level 1 reads the target's features
    f_0..f_{T-2} and predicts f_1..f_{T-1}; level r reads its own level r-1 predictions (chain j's level r
    predicts f_{j+r}, tokens teacher-forced).

    chains: the sorted level-1 indices j whose predictions are used (default all). Only those are unrolled, and the
    rows before the first one are context: the head writes their keys and values and nothing else
    (head.write_context), because a chain attends to every earlier level-1 entry. On a long-context item (a 2k-token
    prompt, a few hundred answer tokens) this skips most of the work: the prompt rows' MLP, their attention queries,
    and their deeper levels, whose masked attention costs seq_len x (r x seq_len) at level r.
    Returns [pred_1, pred_2, ...]: pred_r [n_r, H], row i the chain chains[i], n_r = the chains with j < T - r.
    """
    T = ids.shape[0]
    every = chains is None
    chains = torch.arange(T - 1, device=ids.device) if every else chains
    if chains.numel() == 0:
        return []
    cache = GrowingCache(len(getattr(head, "layers", [None])))
    first = int(chains[0])
    if first > 0:
        head.write_context(ids[1:first + 1], features[:first], cache)  # rows 0..first-1: keys and values only
    level_1 = head.forward(ids[first + 1:], features[first:], cache)  # rows first..T-2, each sees 0..itself
    preds = [level_1 if every else level_1[chains - first]]
    for level in range(2, levels + 1):
        n = int((chains < T - level).sum())
        if n == 0:
            break
        rows = chains[:n]  # chain j sits at index j + level - 1 and reads the token x_{j+level}
        preds.append(head.forward(ids[rows + level], preds[-1][:n], cache, positions=rows + level - 1,
                                  tree_mask=level_mask(T, level, chains, ids.device)))
    return preds


def input_features(head, seq: dict) -> torch.Tensor:
    """The target features a head reads at every position: EAGLE-2 the final-normed hidden [T, H], EAGLE-3 the
    aux layers' states [T, 3H] (data.extract_shards with aux_layers)."""
    if head.kind != "eagle3":
        return seq["hidden"]
    if "aux" not in seq:
        raise ValueError("an EAGLE-3 head trains on aux-layer features: these shards were extracted without them")
    return seq["aux"]


def predicted_feature(head, pred: torch.Tensor) -> torch.Tensor:
    """What the feature loss compares with the target's final-normed hidden: EAGLE-2 predicts it directly;
    EAGLE-3's output goes through its own final norm before the (tied) lm head."""
    return head.lm_input(pred) if head.kind == "eagle3" else pred


def scored_chains(loss_mask: torch.Tensor, levels: int) -> torch.Tensor:
    """The level-1 indices j whose chain has a loss at some level: chain j's level r is scored at position j + r."""
    T = loss_mask.shape[0]
    used = torch.zeros(T - 1, dtype=torch.bool)
    for level in range(1, min(levels, T - 1) + 1):
        used[:T - level] |= loss_mask[level:]
    return used.nonzero().flatten()


def sequence_loss(head, seq: dict, lm_head_weight: torch.Tensor, negatives: int, noise: float,
                  generator: torch.Generator | None = None, cls_weight: float = 0.1, levels: int = 1,
                  level_decay: float = 0.8, feature_weight: float = 1.0):
    """EAGLE loss on one sequence dict (ids, hidden, loss_mask, topk_ids, topk_probs, see train_data).

    levels > 1 adds unrolled draft levels (EAGLE-3's "training-time test"): level r reads the head's own level r-1
    predictions and is weighted level_decay ** (r - 1). Per level: feature_weight * SmoothL1 + cls_weight * CE
    (EAGLE-2: 1 and 0.1 as in EAGLE; EAGLE-3 trains mainly on the CE, the feature term a small regulariser).
    Drafting several levels is where a head trained only on true features breaks down. Only the chains with a loss
    at some level are unrolled (scored_chains, unrolled). Returns (loss, stats) with each level averaged over its
    masked positions; stats: n, vloss, ploss, correct (level-1 sampled top-1 agreement with the target).
    """
    ids, hidden, T = seq["ids"], seq["hidden"], seq["ids"].shape[0]
    n = int(seq["loss_mask"][1:].sum())
    if T < 2 or n == 0:
        return None, None
    dtype = next(p for p in head.parameters() if p.requires_grad).dtype
    features = input_features(head, seq)[:-1].to(dtype)  # f_t [T-1, F]
    if noise > 0:
        u = torch.rand(features.shape, generator=generator, dtype=features.dtype)
        features = features + (u - 0.5) * noise * 512 / features.shape[-1]
    answer = seq["loss_mask"]
    chains = scored_chains(answer, levels)
    preds = unrolled(head, ids, features, levels, chains)

    # Sampled softmax: the candidate rows are every target top-k id of the sequence plus random negatives.
    rand_ids = torch.randint(0, lm_head_weight.shape[0], (negatives,), generator=generator)
    candidates, inverse = torch.unique(torch.cat([seq["topk_ids"].reshape(-1), rand_ids]), return_inverse=True)
    cols = inverse[: seq["topk_ids"].numel()].view_as(seq["topk_ids"])  # [T, k] column of each top-k id
    rows = lm_head_weight[candidates].to(dtype)  # [C, H]
    probs = seq["topk_probs"] / seq["topk_probs"].sum(-1, keepdim=True)

    loss, total_weight, stats = 0.0, 0.0, {"n": n, "vloss": 0.0, "ploss": 0.0, "correct": 0}
    for level, pred in enumerate(preds, start=1):  # row i predicts f at position chains[i] + level
        at = chains[:pred.shape[0]] + level
        mask = answer[at]
        if not mask.any():
            continue
        at = at[mask]
        vloss = F.smooth_l1_loss(predicted_feature(head, pred[mask]), hidden[at].to(pred.dtype),
                                 reduction="none").mean(-1).mean()
        logits = head.lm_input(pred[mask]) @ rows.T  # [m, C]
        top_cols = cols[at]
        ploss = -(probs[at] * logits.float().log_softmax(-1).gather(1, top_cols)).sum(-1).mean()
        weight = level_decay ** (level - 1)
        loss = loss + weight * (feature_weight * vloss + cls_weight * ploss)
        total_weight += weight
        if level == 1:
            stats.update(vloss=float(vloss.detach()), ploss=float(ploss.detach()),
                         correct=int((logits.argmax(-1) == top_cols[:, 0]).sum()))
    return loss / total_weight, stats


@torch.no_grad()
def evaluate(head, sequences, lm_head_weight: torch.Tensor, max_positions: int = 4000, levels: int = 3) -> dict:
    """Full-vocab top-1 agreement with the target per draft level: level 1 from true features; level r from the
    head's own predictions with the inference visibility (`unrolled`), scored where levels 1..r-1 were right (a
    draft chain stops at its first miss, and where the text's next token is the target's greedy one, which the
    chain would have drafted). Also the expected chain length sum_r P(levels 1..r right)."""
    was_training = head.training
    head.eval()
    hits, totals = [0] * levels, [0] * levels
    for seq in sequences:
        if totals[0] >= max_positions:
            break
        ids, hidden, mask, T = seq["ids"], seq["hidden"], seq["loss_mask"], seq["ids"].shape[0]
        if T <= levels:
            continue
        dtype = next(head.parameters()).dtype
        top1 = seq["topk_ids"][:, 0]
        chains = mask[1:].nonzero().flatten()  # a chain starts at every scored position
        alive = torch.ones(chains.numel(), dtype=torch.bool)  # chains still right
        preds = unrolled(head, ids, input_features(head, seq)[:-1].to(dtype), levels, chains)
        for level, pred in enumerate(preds, start=1):
            at = chains[:pred.shape[0]] + level  # the position each chain's level predicts
            alive = alive[: pred.shape[0]]
            if level > 1:  # the chain goes on with the target's greedy token: only where the text took it too
                alive = alive & (ids[at] == top1[at - 1])
            rows = alive.nonzero().flatten()  # the full-vocabulary lm head only where a chain is still alive
            guess = (head.lm_input(pred[rows]).to(lm_head_weight.dtype) @ lm_head_weight.T).argmax(-1)
            totals[level - 1] += rows.numel()
            alive = torch.zeros_like(alive)
            alive[rows] = guess == top1[at[rows]]
            hits[level - 1] += int(alive.sum())
    head.train(was_training)
    return rates_of(hits, totals)


def rates_of(hits: list[int], totals: list[int]) -> dict:
    rates = [h / max(t, 1) for h, t in zip(hits, totals)]
    chain, reach = 0.0, 1.0
    for rate in rates:
        reach *= rate
        chain += reach
    return {"top1": rates[0], **{f"top1_level{r}_given_prev": rates[r - 1] for r in range(2, len(rates) + 1)},
            "expected_chain": chain, "positions": totals[0], "hits": hits, "totals": totals}


def combine(parts: list[dict]) -> dict:
    """Several evaluate() results as one (their counts summed: a position-weighted mean)."""
    if not parts:
        return rates_of([0], [0])
    levels = len(parts[0]["hits"])
    return rates_of([sum(p["hits"][r] for p in parts) for r in range(levels)],
                    [sum(p["totals"][r] for p in parts) for r in range(levels)])
