"""A loaded target (plus its draft head) shared by every request: the CLI, the benchmark and the app use this.

    session = Session("embedded")
    result = session.generate("nanospec", "Write a quicksort in Python.", GenerationConfig(max_new_tokens=64))
    print(result.text, result.summary.tokens_per_s, result.summary.mean_accepted)
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from .config import GenerationConfig, TreeConfig, VocabConfig, resolve_dtype
from .decoding.engine import Request, speculative_decode
from .decoding.plain import hf_generate, plain_decode
from .errors import NanoSpecError
from .metrics import RunSummary, StepStats, summarize
from .models.loading import load_model
from .models.target import TargetModel

METHODS = ("vanilla", "hf", "hf-lookup", "eagle", "static", "nanospec")
DRAFT_METHODS = {"eagle": "full", "static": "static", "nanospec": "nanospec"}  # method -> vocabulary policy
ASSETS = Path(__file__).resolve().parent.parent / "assets"
PROMPT_LOOKUP_TOKENS = 10  # transformers' prompt-lookup decoding: candidate tokens copied from the prompt


def shipped_head_dir(model_key: str) -> Path:
    return ASSETS / "heads" / model_key


@dataclass
class RunResult:
    method: str
    model: str
    text: str
    token_ids: list[int]
    summary: RunSummary
    steps: list[StepStats] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"method": self.method, "model": self.model, "text": self.text, "token_ids": self.token_ids,
                "summary": self.summary.to_json(), "steps": [s.to_json() for s in self.steps if s.round > 0]}


class Session:
    def __init__(self, model: str = "embedded", dtype: str = "auto", device: str = "cpu",
                 head: str | None = None, progress: bool = True):
        try:
            self.dtype = resolve_dtype(dtype, device)
        except ValueError as error:
            raise NanoSpecError(str(error)) from None
        self.model_name, self.head_source = model, head
        self.loaded = load_model(model, dtype=self.dtype, device=device, progress=progress)
        self.tokenizer = self.loaded.tokenizer
        self.target = TargetModel(self.loaded.hf_model)
        self._head = None
        self._frequency = None
        self._warned_no_core = False

    # --- lazily loaded parts -----------------------------------------------------------------------------
    @property
    def head(self):
        """The EAGLE head: --head if given, else the one shipped in assets/ for this model."""
        if self._head is None:
            from .models.eagle import load_head

            source = self.head_source
            if source is None:
                shipped = shipped_head_dir(self.loaded.key)
                if not (shipped / "config.json").exists():
                    raise NanoSpecError(f"no EAGLE head ships for model {self.model_name!r}: "
                                        "pass --head PATH|hub-id|random")
                source = str(shipped)
            self._head = load_head(source, self.target)
        return self._head

    @property
    def frequency(self) -> torch.Tensor | None:
        """Token ids by descending ShareGPT frequency for this tokenizer (static baseline, static core)."""
        if self._frequency is None:
            from .vocab.frequency import frequency_for

            self._frequency = frequency_for(self.loaded.key)
        return self._frequency

    # --- prompts and stop ids ----------------------------------------------------------------------------
    def encode(self, prompt: str, raw: bool = False) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt.strip():
            raise NanoSpecError("the prompt is empty")
        if raw or not getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    @property
    def stop_ids(self) -> frozenset[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, self.loaded.hf_model.generation_config.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return frozenset(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- decoding ----------------------------------------------------------------------------------------
    def make_policy(self, method: str, vocab: VocabConfig):
        from .vocab.policies import make_policy

        head = self.head
        frequency = self.frequency
        name = DRAFT_METHODS[method]
        if frequency is None and (name == "static" or (name == "nanospec" and vocab.static_core > 0)):
            advice = f"run `python -m nanospec_core prepare --model {self.model_name}`"
            if name == "static":
                raise NanoSpecError(f"no frequency table for {self.loaded.key!r}: {advice}")
            # The static core is a refinement of the in-context set, not a requirement: run without it.
            if not self._warned_no_core:
                print(f"note: no frequency table for {self.loaded.key!r}, NanoSpec runs without its static core "
                      f"({advice})", file=sys.stderr)
                self._warned_no_core = True
            vocab = replace(vocab, static_core=0)
        return make_policy(name, head.lm_head_weight, vocab, self.target.vocab_size,
                           head_to_target=head.head_to_target, frequency=frequency)

    def stream(self, method: str, prompt_ids: torch.Tensor, gen: GenerationConfig,
               tree: TreeConfig | None = None, vocab: VocabConfig | None = None) -> Iterator[StepStats]:
        """Yield StepStats for one request with the given method (round 0 = prefill and first token)."""
        if method not in METHODS:
            raise NanoSpecError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        if gen.max_new_tokens < 1:
            raise NanoSpecError("max_new_tokens must be at least 1")
        if gen.temperature < 0:
            raise NanoSpecError("temperature must be >= 0")
        request = Request(prompt_ids=prompt_ids, gen=gen, stop_ids=self.stop_ids)
        if method == "vanilla":
            return plain_decode(self.target, request)
        if method in ("hf", "hf-lookup"):
            lookup = PROMPT_LOOKUP_TOKENS if method == "hf-lookup" else 0
            return hf_generate(self.loaded.hf_model, request, prompt_lookup=lookup)
        policy = self.make_policy(method, vocab or VocabConfig())
        return speculative_decode(self.target, self.head, policy, request, tree or TreeConfig())

    def run(self, method: str, prompt_ids: torch.Tensor, gen: GenerationConfig,
            tree: TreeConfig | None = None, vocab: VocabConfig | None = None) -> RunResult:
        """Run one request to the end, timing the whole of it (prefill included) for tokens/s."""
        start = time.perf_counter()
        steps = list(self.stream(method, prompt_ids, gen, tree, vocab))
        if self.target.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        token_ids = [t for s in steps for t in s.tokens]
        return RunResult(method=method, model=self.model_name, text=self.decode(token_ids), token_ids=token_ids,
                         summary=summarize(steps, wall), steps=steps)

    def generate(self, method: str, prompt: str, gen: GenerationConfig | None = None, raw: bool = False,
                 tree: TreeConfig | None = None, vocab: VocabConfig | None = None) -> RunResult:
        return self.run(method, self.encode(prompt, raw), gen or GenerationConfig(), tree, vocab)
