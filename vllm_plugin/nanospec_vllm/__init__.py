"""NanoSpec for vLLM: an EAGLE-3 draft model whose lm head scores each request's active vocabulary.

Installed next to vLLM (`pip install ./vllm_plugin`), vLLM loads `register` through the `vllm.general_plugins`
entry point in every process. A head whose config.json names the architecture `NanoSpecLlamaForCausalLMEagle3`
(`python -m nanospec_core export-head --nanospec-vllm`) then drafts from per-request active sets; with
NANOSPEC_VLLM_ALL_EAGLE3=1 every Llama-style EAGLE-3 head does (public ones included). Other heads are untouched.
On vLLM's CPU build it also repairs the kernel that spreads sampling settings over draft positions (cpu_expand.py),
without which no speculative sampling there keeps the target's distribution.
"""
from __future__ import annotations

import os

ARCHITECTURE = "NanoSpecLlamaForCausalLMEagle3"
STOCK_EAGLE3 = ("Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle3")  # vLLM 0.32's names for the Llama EAGLE-3 head


def register() -> None:
    from vllm import ModelRegistry

    from . import cpu_expand, hooks

    hooks.check()
    hooks.install()
    cpu_expand.install()  # vLLM 0.32's CPU build: sampled verification needs a correct expand kernel
    target = "nanospec_vllm.model:NanoSpecEagle3LlamaForCausalLM"
    names = (ARCHITECTURE, *STOCK_EAGLE3) if os.environ.get("NANOSPEC_VLLM_ALL_EAGLE3") == "1" else (ARCHITECTURE,)
    for name in names:
        ModelRegistry.register_model(name, target)
