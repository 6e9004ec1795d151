"""The target model as speculative decoding needs it: a compact Llama-family forward over HF weights.

Why our own forward instead of `hf_model(...)`: verification feeds a *tree* of draft tokens (an arbitrary mask among
the new tokens), then keeps only the accepted path in the KV cache. transformers can take 4D masks, but its cache
cannot keep a chosen subset of positions and each call pays mask-building overhead. Here the forward is ~60 lines
that reuse the HF modules' own weights and sub-modules (projections, norms, MLP, rotary embedding), so every
architecture detail (biases, Qwen3's q/k norms, Llama-3 rope scaling) stays exactly HF's. Supported: Llama, Qwen2,
Qwen3, Mistral (sliding windows are ignored: our contexts are far shorter).

KV cache layout: one preallocated tensor per layer, [kv_heads, max_len, head_dim] for keys and values.
  [0, length)                 committed entries (prompt + accepted tokens)
  [length, length + pending)  entries written by forwards since the last commit (a verified tree, draft levels)
`commit(keep)` moves the kept pending entries right after `length`; `discard()` forgets them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import NanoSpecError
from .cpu_layout import matmul_weight

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")


class KVCache:
    """Per-layer key/value storage with a committed prefix and a pending tail (see module docstring)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype, device):
        shape = (num_layers, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # committed entries
        self.pending = 0  # entries written after `length` and not yet committed

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [kv_heads, n, head_dim] at [start, start + n); return views of the whole visible range."""
        end = start + k.shape[1]
        if end > self.max_len:
            raise NanoSpecError(f"KV cache full ({self.max_len} positions): raise max_len or shorten the request")
        self.keys[layer, :, start:end] = k
        self.values[layer, :, start:end] = v
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def commit(self, keep: torch.Tensor | None = None) -> None:
        """Keep pending entries `keep` (indices into the pending tail, increasing) or all of them (None)."""
        if keep is None:
            self.length += self.pending
        else:
            src = keep.to(self.keys.device) + self.length  # [n_keep]
            n = src.numel()
            dst = slice(self.length, self.length + n)
            # index_select copies first, so overlapping source/destination ranges are safe.
            self.keys[:, :, dst] = self.keys.index_select(2, src)
            self.values[:, :, dst] = self.values.index_select(2, src)
            self.length += n
        self.pending = 0

    def discard(self) -> None:
        self.pending = 0

    def crop(self, length: int) -> None:
        """Forget committed entries past `length` (used when a request restarts from a shorter prefix)."""
        self.length, self.pending = min(self.length, length), 0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


CAUSAL = "causal"  # mask sentinel: new tokens are the whole visible range, each sees itself and earlier ones


def write_kv(attn, x: torch.Tensor, cos, sin, cache: KVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of n new tokens x [n, H], stored after the pending tail; returns the whole visible range."""
    n = x.shape[0]
    k = attn.k_proj(x).view(n, -1, attn.head_dim)  # [n, kv_heads, d]
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    v = attn.v_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)  # [kv_heads, n, d]
    k = k.transpose(0, 1)
    # Rotary embedding: rotate each (x_i, x_{i+d/2}) pair by the position's angle; cos/sin [n, d].
    k = k * cos + rotate_half(k) * sin
    return cache.write(layer, k, v, cache.length + cache.pending)


def attention(attn, x: torch.Tensor, cos, sin, cache: KVCache, layer: int, mask) -> torch.Tensor:
    """Self-attention of n new tokens over the cache. x [n, H]; mask [n, visible] bool, None (all visible) or CAUSAL.

    New entries are appended after the pending tail, so successive draft levels see each other through `mask`.
    """
    n = x.shape[0]
    q = attn.q_proj(x).view(n, -1, attn.head_dim)  # [n, heads, d]
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before rotary
        q = attn.q_norm(q)
    q = q.transpose(0, 1)
    q = q * cos + rotate_half(q) * sin  # the same rotary as the keys (write_kv)
    keys, values = write_kv(attn, x, cos, sin, cache, layer)
    groups = q.shape[0] // keys.shape[0]
    if mask is None or mask is CAUSAL:  # one token seeing everything, or a prefill: no mask tensor to build
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            is_causal=mask is CAUSAL, enable_gqa=groups > 1, scale=attn.scaling,
        )[0]
    else:  # a tree or draft-level mask: the 4-D layout with kv heads repeated, which CUDA's memory-efficient
        # kernel takes (3-D inputs or GQA with an explicit mask fall back to the unfused math path)
        keys = keys.repeat_interleave(groups, dim=0) if groups > 1 else keys
        values = values.repeat_interleave(groups, dim=0) if groups > 1 else values
        out = F.scaled_dot_product_attention(q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                             attn_mask=mask[None, None], scale=attn.scaling)[0]
    return attn.o_proj(out.transpose(0, 1).reshape(n, -1))  # [n, H]


def decoder_layer(layer, x, cos, sin, cache, index: int, mask, skip_input_norm: bool = False) -> torch.Tensor:
    """One pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.)). EAGLE's head skips the first norm."""
    h = x if skip_input_norm else layer.input_layernorm(x)
    x = x + attention(layer.self_attn, h, cos, sin, cache, index, mask)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def visible_mask(cache: KVCache, n: int, tree_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean [n, length + pending + n] mask: committed entries always visible; pending + new per `tree_mask`.

    tree_mask: [n, pending + n] or None, meaning causal among the new tokens with every pending entry visible.
    Returns None when a single token sees everything, CAUSAL for a prefill into an empty cache (the same SDPA
    calls transformers makes, so plain decoding matches `generate` as closely as kernels allow).
    """
    if tree_mask is None:
        if n == 1:
            return None
        if cache.length + cache.pending == 0:
            return CAUSAL
        tree_mask = torch.ones(n, cache.pending + n, dtype=torch.bool, device=device)
        tree_mask[:, cache.pending:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    prefix = torch.ones(n, cache.length, dtype=torch.bool, device=device)
    return torch.cat([prefix, tree_mask.to(device)], dim=1)


@dataclass
class TargetOutput:
    hidden: torch.Tensor  # [n, H] last layer after the final norm (EAGLE-2's feature; logits = lm_head(hidden))
    aux: torch.Tensor | None  # [n, len(aux_layers) * H] chosen layers' outputs concatenated (EAGLE-3's features)


class TargetModel:
    """Wraps a loaded HF causal LM (weights shared, nothing copied) with a tree-mask + keep-path forward."""

    def __init__(self, hf_model):
        config = hf_model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise NanoSpecError(
                f"model type {config.model_type!r} is not supported: choose a {', '.join(SUPPORTED_TYPES)} model"
            )
        self.hf_model = hf_model
        self.config = config
        self.backbone = hf_model.model
        self.lm_head_weight = hf_model.lm_head.weight  # [V, H]
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.vocab_size = self.lm_head_weight.shape[0]
        attn = self.backbone.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_kv_heads = attn.k_proj.out_features // attn.head_dim
        self.dtype = self.lm_head_weight.dtype
        self.device = self.lm_head_weight.device
        # The logits multiply with the layout load_model chose: the weight, or its column-major copy on a CPU
        # where that measured faster (cpu_layout.py). Looked up once: a later layout change is not followed.
        self._logits_weight = matmul_weight(self.lm_head_weight)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.num_layers, self.num_kv_heads, self.head_dim, max_len, self.dtype, self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed_tokens(ids)

    def rotary(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.backbone.rotary_emb(like, positions.unsqueeze(0))  # [1, n, d] each
        return cos[0], sin[0]

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        aux_layers: tuple[int, ...] = (),
    ) -> TargetOutput:
        """Run n new tokens `ids` [n] after the cache's visible entries; their KV lands in the pending tail.

        positions: [n] absolute positions (default: consecutive after length + pending; a tree passes
        length + depth). aux_layers: indices in HF's `hidden_states` convention (0 = embeddings, i = output of
        layer i - 1), e.g. EAGLE-3's (2, L // 2, L - 3).
        """
        n = ids.shape[0]
        start = cache.length + cache.pending
        if positions is None:
            positions = torch.arange(start, start + n, device=self.device)
        x = self.embed(ids)  # [n, H]
        cos, sin = self.rotary(positions, x)
        mask = visible_mask(cache, n, tree_mask, self.device)
        captured = []
        for index, layer in enumerate(self.backbone.layers):
            if index in aux_layers:
                captured.append(x)
            x = decoder_layer(layer, x, cos, sin, cache, index, mask)
        if self.num_layers in aux_layers:
            captured.append(x)
        cache.pending += n
        aux = torch.cat(captured, dim=-1) if captured else None
        return TargetOutput(hidden=self.backbone.norm(x), aux=aux)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n, V] in float32 (argmax and softmax are then exact regardless of the model dtype)."""
        return F.linear(hidden, self._logits_weight).float()

    def topk_ids(self, hidden: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
        """Target top-k ids at every row of hidden [n, H] -> [n, k], in chunks to bound the [chunk, V] logits."""
        parts = [self.logits(hidden[i:i + chunk]).topk(k, dim=-1).indices for i in range(0, hidden.shape[0], chunk)]
        return torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.long, device=self.device)
