"""BlueLM's chat format (docs/BLUELM.md section 3), the one place that spells it.

    [|Human|]:{q1}[|AI|]:{a1}</s>[|Human|]:{q2}[|AI|]:

BOS goes in front, added by the tokenizer. The markers are added tokens (ids 100000 and
100001 in the published tokenizers); the 32K models add [SEH] / [SEA].
"""
from __future__ import annotations

from typing import Sequence

HUMAN = "[|Human|]:"
AI = "[|AI|]:"
EOS = "</s>"
CHAT_MARKERS = (HUMAN, AI, "[SEH]", "[SEA]")


def turn(query: str, answer: str) -> str:
    """One finished turn: [|Human|]:{query}[|AI|]:{answer}</s>."""
    return f"{HUMAN}{query}{AI}{answer}{EOS}"


def prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The past turns, then the open one the model answers (no BOS: the tokenizer adds it)."""
    return "".join(turn(q, a) for q, a in history) + f"{HUMAN}{query}{AI}"
