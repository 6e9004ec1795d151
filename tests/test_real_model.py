"""One check on the real embedded model (Qwen2.5-Coder-0.5B-Instruct from the pinned wheels): vanilla equals hf."""
import pytest
import torch

from nanospec_core.config import GenerationConfig


@pytest.fixture(scope="module")
def session():
    from nanospec_core.session import Session

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield Session("embedded", dtype="bfloat16", progress=False)
    torch.set_num_threads(threads)


def test_embedded_vanilla_equals_hf_generate(session):
    prompt = session.encode("Write a Python function that returns the n-th Fibonacci number.")
    gen = GenerationConfig(max_new_tokens=8)
    vanilla = session.run("vanilla", prompt, gen)
    hf = session.run("hf", prompt, gen)
    assert vanilla.token_ids == hf.token_ids
    assert len(vanilla.token_ids) == 8 and vanilla.text.strip()


def test_embedded_random_head_eagle_is_exact_in_float32():
    """The issue's done-criterion at small scale: a random head only lowers acceptance, never changes output."""
    from nanospec_core.session import Session

    session = Session("embedded", dtype="float32", head="random", progress=False)
    prompt = session.encode("List three prime numbers.")
    gen = GenerationConfig(max_new_tokens=6)
    assert session.run("eagle", prompt, gen).token_ids == session.run("vanilla", prompt, gen).token_ids
