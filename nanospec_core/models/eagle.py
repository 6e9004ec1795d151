"""EAGLE draft heads: the small network that proposes tokens from the target's own hidden states.

References: Li et al., EAGLE (ICML 2024), EAGLE-2 (EMNLP 2024), EAGLE-3 (2025). Architectures as in SafeAILab/EAGLE
(eagle/model/cnets1.py for EAGLE-1/2, cnets.py for EAGLE-3) and sgl-project/SpecForge (LlamaForCausalLMEagle3).

One forward over n new tokens ids [n] whose features f [n, F] come from the target, or from the head's own previous
output while drafting deeper levels:
  EAGLE-2  x = fc([embed(ids), f])                 f: the target's final-normed hidden (TargetOutput.hidden)
           x = x + attn(x)                         the head's first (only) layer has NO input norm
           x = x + mlp(post_norm(x))               -> returned; logits = x @ target_lm_head.T
  EAGLE-3  h = fc(f) if f is [n, 3H] else f        f: target layers aux_layers concatenated, or own output [n, H]
           x = h + attn([in_norm(embed(ids)), hidden_norm(h)])     q/k/v read the 2H concatenation
           x = x + mlp(post_norm(x))               -> returned; logits = lm_head(norm(x)) over a draft vocabulary
                                                      whose row i is target id i + d2t[i]
Both reuse target.py's attention() and KVCache, so positions, tree masks, pending draft levels and commit(keep) behave
exactly as in TargetModel.forward. Embeddings are always the target's (frozen, never copied).

EAGLE-3 aux layers, HF `hidden_states` convention (i = input of decoder layer i, 0 = embeddings): SafeAILab's
modeling_llama_kv.py records the inputs of layers 2, L // 2 and L - 3; SpecForge hooks the outputs of layers
1, L // 2 - 1 and L - 4: the same tensors, so the default is (2, L // 2, L - 3).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import NanoSpecError
from .target import KVCache, TargetModel, TargetOutput, attention, decoder_layer, visible_mask, write_kv

# Layer-config fields a head checkpoint may set; everything else follows the target's config.
LAYER_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_act", "rms_norm_eps", "max_position_embeddings")


def layer_config(config_class, target: TargetModel, overrides: dict | None = None):
    """HF config of ONE decoder layer: the target's sizes and rope, replaced by a checkpoint's `overrides`."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    base = target.config
    fields = {k: getattr(base, k) for k in LAYER_FIELDS if getattr(base, k, None) is not None}
    fields.update({k: overrides[k] for k in LAYER_FIELDS if k in overrides})
    if "num_attention_heads" in overrides and "head_dim" not in overrides:  # Llama-style: head_dim = hidden / heads
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    if "rope_parameters" in overrides:  # written by transformers >= 5
        fields["rope_parameters"] = overrides["rope_parameters"]
    elif "rope_theta" in overrides:  # EAGLE's configs: transformers 4 names
        fields.update(rope_theta=overrides["rope_theta"], rope_scaling=overrides.get("rope_scaling"))
    else:
        fields["rope_parameters"] = copy.deepcopy(base.rope_parameters)
    return config_class(**fields, vocab_size=target.vocab_size, num_hidden_layers=1)


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's (2, L // 2, L - 3); tiny targets (L < 7) where those collide use the last three (L - 2, L - 1, L)."""
    chosen = (2, num_layers // 2, num_layers - 3)
    if chosen[0] < chosen[1] < chosen[2]:
        return chosen
    return tuple(max(0, num_layers - k) for k in (2, 1, 0))


class DraftHead(nn.Module):
    """Common base: target embeddings, rotary, KV cache and the forward's input preparation.

    forward(ids [n], features [n, F], cache, positions=None, tree_mask=None) -> hidden [n, H] behaves like
    TargetModel.forward: new KV entries land in the pending tail (cache.pending += n), positions default to
    consecutive after length + pending, tree_mask is [n, pending + n]. Draft logits: lm_input(hidden) @
    lm_head_weight.T, whose row i is target id head_to_target[i] (or i when None).
    """

    kind: str = ""
    aux_layers: tuple[int, ...] = ()
    head_to_target: torch.Tensor | None  # [Vh] target id of each lm-head row; None = identity

    def __init__(self, target: TargetModel, config):
        super().__init__()
        self.target = target  # a plain object, not an nn.Module: its weights are neither registered nor saved
        self.config = config  # HF config of the head's one layer (saved into config.json)
        self.hidden_size = target.hidden_size
        self.register_buffer("head_to_target", None, persistent=False)  # a buffer so it follows .to(device)

    def _finish(self, rotary_class) -> None:
        """Move to the target's device and dtype, then build the rotary embedding.

        The rotary module is kept out of the registered submodules so `.to(bfloat16)` never rounds its inverse
        frequencies (a bf16 inv_freq is off by whole radians at position ~1000); HF's forward moves it per call.
        """
        self.to(device=self.target.device, dtype=self.target.dtype)
        self._rotary = [rotary_class(self.config).to(self.target.device)]

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def attn(self):
        raise NotImplementedError

    def rotary(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rotary[0](like, positions.unsqueeze(0))  # [1, n, head_dim] each
        return cos[0], sin[0]

    def new_cache(self, max_len: int) -> KVCache:
        attn = self.attn
        kv_heads = attn.k_proj.out_features // attn.head_dim
        return KVCache(1, kv_heads, attn.head_dim, max_len, self.dtype, self.target.device)

    def target_features(self, out: TargetOutput) -> torch.Tensor:
        raise NotImplementedError

    def lm_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @property
    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def write_context(self, ids, features, cache) -> None:
        """Only the keys and values of n positions (consecutive after the cache's tail), as forward writes them:
        for positions whose outputs nobody reads, such as a training sequence's prompt (training/loss.unrolled)."""
        emb, features, cos, sin, _ = self._inputs(ids, features, cache, None, None, with_mask=False)
        write_kv(self.attn, self._attention_inputs(emb, features)[1], cos, sin, cache, 0)
        cache.pending += ids.shape[0]

    def _attention_inputs(self, emb, features) -> tuple[torch.Tensor, torch.Tensor]:
        """(the residual stream [n, H], the attention's input) of one forward."""
        raise NotImplementedError

    def _inputs(self, ids, features, cache, positions, tree_mask, with_mask: bool = True):
        """Embeddings [n, H], features in the head's dtype, rotary cos/sin [n, d] and the visibility mask."""
        n = ids.shape[0]
        if positions is None:
            start = cache.length + cache.pending
            positions = torch.arange(start, start + n, device=ids.device)
        if features.is_inference() and torch.is_grad_enabled():
            features = features.clone()  # target.forward runs under inference_mode; autograd cannot save those
        with torch.no_grad():  # the target's embeddings stay frozen
            emb = self.target.embed(ids)  # [n, H]
        cos, sin = self.rotary(positions, emb)
        mask = visible_mask(cache, n, tree_mask, emb.device) if with_mask else None
        return emb.to(self.dtype), features.to(self.dtype), cos, sin, mask


class Eagle2Head(DraftHead):
    """EAGLE-1/2 head: fc(2H -> H) over [embedding, feature], one target-architecture layer, the target's lm head."""

    kind = "eagle2"
    aux_layers = ()

    def __init__(self, target: TargetModel, config=None, bias: bool = True):
        super().__init__(target, config or layer_config(type(target.config), target))
        hidden = self.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=bias)
        # transformers' own layer class for the target's family (Qwen2 keeps its q/k/v biases, Qwen3 its q/k norms).
        layer = type(target.backbone.layers[0])(self.config, 0)
        layer.input_layernorm = nn.Identity()  # EAGLE's first layer has no input norm (cnets1.py: index 0)
        self.layers = nn.ModuleList([layer])
        self._finish(type(target.backbone.rotary_emb))

    @property
    def attn(self):
        return self.layers[0].self_attn

    def target_features(self, out: TargetOutput) -> torch.Tensor:
        return out.hidden

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.target.lm_head_weight  # shared with the target: not a parameter of the head, never saved

    def _attention_inputs(self, emb, features):
        x = self.fc(torch.cat([emb, features], dim=-1))  # [n, H]; the layer has no input norm
        return x, x

    def forward(self, ids, features, cache: KVCache, positions=None, tree_mask=None) -> torch.Tensor:
        """ids [n], features [n, H] -> hidden [n, H] (the next feature; logits = hidden @ lm_head_weight.T)."""
        if features.shape[-1] != self.hidden_size:
            raise ValueError(f"EAGLE-2 features must be [n, {self.hidden_size}], got {tuple(features.shape)}")
        emb, features, cos, sin, mask = self._inputs(ids, features, cache, positions, tree_mask)
        x, _ = self._attention_inputs(emb, features)
        x = decoder_layer(self.layers[0], x, cos, sin, cache, 0, mask, skip_input_norm=True)
        cache.pending += ids.shape[0]
        return x


class Eagle3Head(DraftHead):
    """EAGLE-3 head: fused multi-layer target features, one 2H-input Llama layer, its own draft-vocabulary lm head."""

    kind = "eagle3"

    def __init__(self, target: TargetModel, config=None, draft_vocab_size: int | None = None,
                 d2t: torch.Tensor | None = None, aux_layers: tuple[int, ...] | None = None,
                 norm_before_residual: bool = False, tied_lm_head: bool = False):
        """draft_vocab_size: rows of the lm head (default: the target's vocabulary); d2t: their map to target ids,
        required when the draft vocabulary is smaller (NanoSpecError otherwise). tied_lm_head: score with the
        target's own lm head (full vocabulary, frozen, neither a parameter of the head nor saved with it), as
        NanoSpec's EAGLE-3 head does: the lm-head cost is then the one NanoSpec removes, not hidden by pruning."""
        from transformers.models.llama import modeling_llama as llama

        super().__init__(target, config or layer_config(llama.LlamaConfig, target))
        hidden = self.hidden_size
        self.aux_layers = tuple(aux_layers) if aux_layers is not None else default_aux_layers(target.num_layers)
        if list(self.aux_layers) != sorted(set(self.aux_layers)) or not 0 <= min(self.aux_layers) <= max(
                self.aux_layers) <= target.num_layers:
            raise NanoSpecError(f"EAGLE-3 aux layers {self.aux_layers} must be increasing indices in "
                                f"[0, {target.num_layers}] of the target's layers")
        # speculators-format heads take the residual after hidden_norm; EAGLE / SpecForge before it.
        self.norm_before_residual = norm_before_residual
        self.draft_vocab_size = draft_vocab_size or target.vocab_size
        if self.draft_vocab_size > target.vocab_size:
            raise NanoSpecError(f"EAGLE-3 draft vocabulary ({self.draft_vocab_size}) is larger than the target's "
                                f"({target.vocab_size}): the head belongs to another model")
        if tied_lm_head and self.draft_vocab_size != target.vocab_size:
            raise NanoSpecError("a tied EAGLE-3 lm head is the target's: its draft vocabulary is the full one")
        self.tied_lm_head = tied_lm_head
        self.fc = nn.Linear(len(self.aux_layers) * hidden, hidden, bias=False)
        layer = llama.LlamaDecoderLayer(self.config, 0)
        for name in ("q_proj", "k_proj", "v_proj"):  # attention reads [embedding, feature]: 2H wide
            old = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, nn.Linear(2 * hidden, old.out_features, bias=old.bias is not None))
        layer.hidden_norm = llama.LlamaRMSNorm(hidden, eps=self.config.rms_norm_eps)
        self.midlayer = layer
        self.norm = llama.LlamaRMSNorm(hidden, eps=self.config.rms_norm_eps)
        self.lm_head = None if tied_lm_head else nn.Linear(hidden, self.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long))  # target = i + d2t[i]
        self.register_buffer("t2d", torch.zeros(target.vocab_size, dtype=torch.bool))  # target id in draft vocab
        self._finish(llama.LlamaRotaryEmbedding)
        self.set_vocab_map(d2t)

    @property
    def attn(self):
        return self.midlayer.self_attn

    def set_vocab_map(self, d2t: torch.Tensor | None) -> None:
        """Install the draft -> target id map (d2t [Vh], target id = i + d2t[i]); t2d and head_to_target follow."""
        vocab, draft = self.target.vocab_size, self.draft_vocab_size
        if d2t is None or not bool(d2t.any()):
            if draft != vocab:  # the known failure: a reduced-vocab head without its map drafts garbage ids
                state = "missing" if d2t is None else "all zeros"
                raise NanoSpecError(f"EAGLE-3 head has a {draft}-token draft vocabulary but its d2t map is {state}, "
                                    f"so draft ids cannot be mapped to the target's {vocab} ids; export the head "
                                    f"with its d2t buffer")
            d2t = torch.zeros(draft, dtype=torch.long)
        if tuple(d2t.shape) != (draft,):
            raise NanoSpecError(f"EAGLE-3 d2t has shape {tuple(d2t.shape)}, expected ({draft},)")
        device = self.d2t.device
        head_to_target = torch.arange(draft, device=device) + d2t.to(device=device, dtype=torch.long)
        if int(head_to_target.min()) < 0 or int(head_to_target.max()) >= vocab:
            raise NanoSpecError(f"EAGLE-3 d2t maps draft ids outside the target's vocabulary of {vocab}: "
                                f"the head belongs to another model")
        self.d2t.copy_(head_to_target - torch.arange(draft, device=device))
        self.t2d.zero_()
        self.t2d[head_to_target] = True
        identity = draft == vocab and not bool(self.d2t.any())
        self.head_to_target = None if identity else head_to_target

    def target_features(self, out: TargetOutput) -> torch.Tensor:
        if out.aux is None or out.aux.shape[-1] != self.fc.in_features:
            raise ValueError(f"EAGLE-3 needs target.forward(..., aux_layers={self.aux_layers}) features "
                             f"[n, {self.fc.in_features}]")
        return out.aux

    def lm_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.target.lm_head_weight if self.tied_lm_head else self.lm_head.weight

    def _attention_inputs(self, emb, features):
        if features.shape[-1] == self.fc.in_features:
            features = self.fc(features)  # fuse low / mid / high target layers: [n, 3H] -> [n, H]
        layer = self.midlayer
        normed = layer.hidden_norm(features)
        residual = normed if self.norm_before_residual else features
        return residual, torch.cat([layer.input_layernorm(emb), normed], dim=-1)  # q/k/v read [n, 2H]

    def forward(self, ids, features, cache: KVCache, positions=None, tree_mask=None) -> torch.Tensor:
        """ids [n], features [n, 3H] (target) or [n, H] (own output) -> hidden [n, H], before the final norm."""
        width = features.shape[-1]
        if width not in (self.fc.in_features, self.hidden_size):
            raise ValueError(f"EAGLE-3 features must be [n, {self.fc.in_features}] or [n, {self.hidden_size}], "
                             f"got {tuple(features.shape)}")
        emb, features, cos, sin, mask = self._inputs(ids, features, cache, positions, tree_mask)
        residual, qkv_input = self._attention_inputs(emb, features)
        layer = self.midlayer
        x = residual + attention(layer.self_attn, qkv_input, cos, sin, cache, 0, mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.pending += ids.shape[0]
        return x


def random_head(target: TargetModel, kind: str = "eagle2", seed: int = 0, **options) -> DraftHead:
    """A head with PyTorch's default random init (reproducible for `seed`; the global RNG is left untouched);
    options go to the head's class (e.g. tied_lm_head=True for EAGLE-3)."""
    classes = {"eagle2": Eagle2Head, "eagle3": Eagle3Head}
    if kind not in classes:
        raise NanoSpecError(f"unknown EAGLE head kind {kind!r}: choose eagle2 or eagle3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return classes[kind](target, **options)

