"""Weight layout for CPU matrix products over a few rows: keep nn.Linear weights column-major.

`F.linear(x, W)` computes x @ W.T. PyTorch stores W [out, in] row-major, so the BLAS call is x @ (W stored
transposed). For x with 1 row that is a matrix-vector product and runs at memory speed either way; for the 4-16 rows
of a verified tree or a draft level, MKL's kernel for this layout ran at half the speed of the plain product
x @ W_t with W_t [in, out] contiguous. Storing the same values as W = W_t.t() (shape [out, in], strides (1, out))
makes `F.linear` take the fast kernel with no change to any caller or to the values.

Measured with `verification_curve` (embedded Qwen2.5-Coder-0.5B, float32, 2 cores of an AVX-512 Xeon, context 200,
three interleaved repeats; every Linear, lm head included): a target forward over 8 new tokens took 206-217 ms
row-major and 139-153 ms column-major, 16 tokens 201-217 -> 168-170 ms, 1 token 84-88 -> 84-92 ms (unchanged).

Only the backbone is converted in place. The lm head is often tied to the token embedding, whose row lookups (and
NanoSpec's row gathers into its active buffer) want row-major storage, so the target's logits and plain EAGLE's
full-vocabulary draft head share one column-major copy of it (`column_major_view`; a second V x H tensor, 545 MB in
float32 for the embedded model). For 8 rows of the embedded lm head: 45 ms row-major, 31 ms column-major.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

_copies = WeakTensorKeyDictionary()  # weight -> its column-major copy, alive as long as the weight


def _column_major(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> the same values in new storage with strides (1, out), detached."""
    return weight.detach().t().contiguous().t()


def column_major_view(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] values stored column-major (cached: one copy per weight); CPU only, else `weight`.

    For frozen inference weights: the copy does not follow later in-place updates of `weight`.
    """
    if weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return weight
    copy = _copies.get(weight)
    if copy is None:
        copy = _copies[weight] = _column_major(weight)
    return copy


def column_major_linears(module: nn.Module) -> int:
    """Re-store every nn.Linear weight under `module` column-major (same shape and values); return how many."""
    converted = 0
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear) and sub.weight.is_contiguous() and sub.weight.dim() == 2:
                sub.weight = nn.Parameter(_column_major(sub.weight), requires_grad=sub.weight.requires_grad)
                converted += 1
    return converted


def column_major_lm_head(hf_model) -> bool:
    """Make HF's own lm head (what transformers `generate` and prompt lookup call) multiply with the shared
    column-major copy, so those baselines get the same layout as our target; its weight, tied to the embedding,
    stays as it is. Returns whether there was a Linear lm head to patch."""
    head = hf_model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu":
        return False
    weight = column_major_view(head.weight)  # looked up once, not on every forward
    head.forward = lambda x: F.linear(x, weight, head.bias)
    return True
