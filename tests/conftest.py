"""Shared fixtures: tiny random-weight models built from configs (nothing is downloaded)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

TINY_VOCAB = 4096


def tiny_hf_model(model_type: str = "qwen2", vocab: int = TINY_VOCAB, layers: int = 2, seed: int = 0,
                  dtype=torch.float32):
    """A 2-layer, hidden-64 causal LM of the given family with random weights (scaled up so argmaxes are clear)."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    configs = {
        "qwen2": lambda: transformers.Qwen2Config(**common, rope_theta=10000.0),
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
    }
    config = configs[model_type]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init's 0.02 std give peaked, varied next-token distributions
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.15 if "embed" not in name else 1.0)
    return model.to(dtype).eval().requires_grad_(False)


@pytest.fixture(params=["qwen2", "llama"])
def tiny_model(request):
    return tiny_hf_model(request.param)
