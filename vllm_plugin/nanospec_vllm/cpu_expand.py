"""A repair for vLLM 0.32's CPU build: speculative sampling (temperature > 0) verifies against garbage temperatures.

The rejection sampler spreads each request's sampling settings over its draft positions with
`expand_batch_to_tokens` (temperature, top-k, top-p: [batch] -> [tokens]). Without Triton, the CPU platform
replaces the Triton kernel behind it (`rejection_sampler.expand_kernel`) with a C++ one through
`vllm.utils.cpu_triton_utils._expand_kernel_impl`, which converts the output tensor to int64 (a copy, for every
float or int32 tensor), lets the C++ kernel fill the copy, and never writes it back: the expanded settings stay the
uninitialised memory of `new_empty`. Every verified position is then sampled from the target's logits divided by
whatever that memory held, and the output no longer follows the target's distribution, with or without NanoSpec
(measured: vLLM's own EAGLE-3 at temperature 1 on a tiny target put 188 of 192 second tokens on the argmax, where
the target gives it 93; greedy requests are unaffected: they never read the expanded temperatures).

`install()` wraps the platform's `register_triton_kernel_overrides` (the worker calls it right after loading the
plugins, so a plain registration at plugin load would be overwritten): after vLLM's overrides, `probe()` expands a
known float tensor through the kernel vLLM will launch; only if that answer is wrong is `expand` registered in its
place, through vLLM's own override interface (`vllm.triton_utils.dispatcher.register_kernels`), with one log line.
A vLLM whose kernel is right (Triton present, a GPU, a fixed release) is left alone.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vllm.nanospec")
KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):  # noqa: N803
    """What the Triton kernel does, in any dtype: request r's value (replace_from -> replace_to) written over its
    tokens cu_num_tokens[r - 1]:cu_num_tokens[r] of `output`."""
    if cu_num_tokens.numel() == 0:
        return
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    ends = cu_num_tokens.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    output[:int(ends[-1])] = values.repeat_interleave(counts).to(output.dtype)


def probe() -> bool:
    """Does vLLM's expand (as it will run in this process) spread a float tensor correctly?"""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    values = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float32)
    got = expand_batch_to_tokens(values, torch.tensor([1, 3, 4], dtype=torch.int32), 4, replace_from=0,
                                 replace_to=1)  # as the sampler calls it (temperature 0 -> 1)
    return torch.equal(got, torch.tensor([0.5, 2.0, 2.0, 1.0]))


def repair() -> bool:
    """Probe; register `expand` when vLLM's answer is wrong. Returns whether it registered."""
    if probe():
        return False
    from vllm.triton_utils.dispatcher import register_kernels

    register_kernels({KERNEL: expand})
    if not probe():
        raise RuntimeError("nanospec: vLLM's expand kernel is wrong and the repair did not take")
    logger.warning("nanospec-vllm: vLLM's CPU expand kernel leaves the expanded sampling settings uninitialised "
                   "(speculative sampling would not keep the target's distribution); replaced (cpu_expand.py)")
    return True


def install() -> None:
    """Repair after the platform registers its kernel overrides (once per process, however often this runs)."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    original = getattr(platform, "register_triton_kernel_overrides", None)
    if original is None or getattr(original, "nanospec_wrapped", False):
        return

    def register_then_repair(cls, *args, **kwargs):
        result = original(*args, **kwargs)
        repair()
        return result

    register_then_repair.nanospec_wrapped = True
    platform.register_triton_kernel_overrides = classmethod(register_then_repair)
