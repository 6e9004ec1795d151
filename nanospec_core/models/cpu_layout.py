"""Weight layout for CPU matrix products over a few rows: row-major (PyTorch's own) or column-major.

`F.linear(x, W)` computes x @ W.T. PyTorch stores W [out, in] row-major, so the BLAS call is x @ (W stored
transposed). For x with 1 row that is a matrix-vector product and runs at memory speed either way; for the 4-16 rows
of a verified tree or a draft level the kernels differ. Storing the same values as W = W_t.t() (shape [out, in],
strides (1, out)) makes `F.linear` take the other kernel with no change to any caller or to the values.

Which layout is faster depends on the machine and the dtype, so machine.py measures it (`auto`) and load_model
applies the choice. Seen so far (embedded Qwen2.5-Coder-0.5B, 2 cores, context 200): on an AVX-512 Xeon in float32
a target forward over 8 new tokens took 206-217 ms row-major and 139-153 ms column-major (1 token unchanged); on a
Zen 4 EPYC in bf16, row-major was faster (8 tokens + logits 84.5 vs 111 ms).

Only the backbone is converted in place. The lm head is often tied to the token embedding, whose row lookups (and
NanoSpec's row gathers into its active buffer) want row-major storage, so a column-major lm head is a second copy
(`add_column_major_copy`; V x H, 545 MB in float32 for the embedded model) that the target's logits, plain EAGLE's
full-vocabulary draft head and transformers' own lm head all multiply with (`matmul_weight`).
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


def add_column_major_copy(weight: torch.Tensor) -> torch.Tensor:
    """Make (once) and register a column-major copy of a CPU weight; return it. Elsewhere returns `weight`.

    For frozen inference weights: the copy does not follow later in-place updates of `weight`.
    """
    if weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return weight
    copy = _copies.get(weight)
    if copy is None:
        copy = _copies[weight] = _column_major(weight)
    return copy


def matmul_weight(weight: torch.Tensor) -> torch.Tensor:
    """What to multiply with for `weight`: its registered column-major copy if the layout chose one, else itself."""
    return _copies.get(weight, weight)


def column_major_linears(module: nn.Module) -> int:
    """Re-store every nn.Linear weight under `module` column-major (same shape and values); return how many."""
    converted = 0
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear) and sub.weight.is_contiguous() and sub.weight.dim() == 2:
                sub.weight = nn.Parameter(_column_major(sub.weight), requires_grad=sub.weight.requires_grad)
                converted += 1
    return converted


def patch_lm_head(hf_model, column: bool) -> bool:
    """Make HF's own lm head (what transformers `generate` and prompt lookup call) multiply a contiguous input, with
    a column-major copy of its weight when `column`, so those baselines get the same layout as our target; the
    weight, tied to the embedding, stays as it is. Returns whether there was a Linear lm head on the CPU to patch.

    Why contiguous: generate's prefill passes hidden[:, -1:, :], a strided 3-D slice, and F.linear on the CPU then
    broadcasts the weight to [B, H, V] and copies it (measured: B = 16, V = 151,936, bf16: 11.4 s, against 0.03 s
    for the same product on a contiguous copy of the 16 x 896 input)."""
    head = hf_model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu":
        return False
    weight = add_column_major_copy(head.weight) if column else head.weight  # looked up once, not per forward
    head.forward = lambda x: F.linear(x.contiguous(), weight, head.bias)
    return True


def apply_layout(hf_model, backbone: str = "row", lm_head: str = "row") -> None:
    """Store a loaded CPU model's weights as chosen ('row' | 'column' each; row-major is PyTorch's own) and patch
    HF's lm head (patch_lm_head)."""
    for name, value in (("backbone", backbone), ("lm_head", lm_head)):
        if value not in ("row", "column"):
            raise ValueError(f"{name} layout must be 'row' or 'column', got {value!r}")
    if backbone == "column":
        column_major_linears(hf_model.base_model)
    patch_lm_head(hf_model, column=lm_head == "column")
