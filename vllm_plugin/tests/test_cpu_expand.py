"""The repair of vLLM 0.32's CPU expand kernel (nanospec_vllm/cpu_expand.py), without an engine: the probe finds
vLLM's override wrong, the repair spreads each request's settings over its draft positions in any dtype, and a
correct kernel is left alone. End to end: test_plugin.py's sampled-distribution test (it fails without the repair)."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")
import torch  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.triton_utils.dispatcher import register_kernels  # noqa: E402
from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens  # noqa: E402

from nanospec_vllm import cpu_expand  # noqa: E402

pytestmark = pytest.mark.skipif(not current_platform.is_cpu(), reason="the CPU build's kernel override")


def reference(values, counts, replace_from=0, replace_to=0):
    return torch.where(values == replace_from, torch.as_tensor(replace_to, dtype=values.dtype),
                       values).repeat_interleave(counts)


def test_vllms_own_override_is_found_wrong_and_repaired():
    current_platform.register_triton_kernel_overrides()  # whatever install() did before: vLLM's overrides now
    cpu_expand.install()
    current_platform.register_triton_kernel_overrides()  # as the worker calls it after loading the plugins
    assert cpu_expand.probe()
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.int32, torch.int64):
        counts = torch.randint(0, 5, (9,), generator=generator)
        values = (torch.rand(9, generator=generator) * 3).to(dtype)
        values[2] = 0
        cu = counts.cumsum(0).to(torch.int32)
        got = expand_batch_to_tokens(values, cu, int(cu[-1]), replace_from=0, replace_to=1)
        assert torch.equal(got, reference(values, counts, 0, 1)), dtype


def test_the_probe_sees_vllms_kernel_as_it_runs():
    import vllm.utils.cpu_triton_utils as vllm_cpu

    register_kernels({cpu_expand.KERNEL: vllm_cpu._expand_kernel_impl})  # vLLM 0.32's own CPU override
    assert not cpu_expand.probe()
    assert cpu_expand.repair() and cpu_expand.probe()
    assert not cpu_expand.repair()  # a correct kernel is left alone
