"""NanoSpec: EAGLE-2/EAGLE-3 speculative decoding whose draft lm head scores a small in-context vocabulary.

    from nanospec_core import GenerationConfig, Session
    session = Session("embedded")
    print(session.generate("nanospec", "Write a quicksort in Python.", GenerationConfig(max_new_tokens=64)).text)
"""
from .config import GenerationConfig, TreeConfig, VocabConfig
from .errors import NanoSpecError
from .session import METHODS, RunResult, Session

__all__ = ["GenerationConfig", "TreeConfig", "VocabConfig", "NanoSpecError", "METHODS", "RunResult", "Session"]
