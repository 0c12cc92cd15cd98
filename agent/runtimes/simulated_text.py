"""What the simulated server says and counts: its token model, prompt hashing, histograms.

Prompts are cut into tokens of four characters (or taken exactly from ``input_ids``); a chat
message adds four tokens of its own for the role. :func:`prefix_hashes` hashes a prompt's tokens
in blocks, each block's BLAKE2b hash chained over the blocks before it (stable across
processes), for the model's prefix cache. Generated text is placeholder words.

No I/O; imported by :mod:`agent.runtimes.simulated_server` only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

_WORDS = (
    "the quick brown fox jumps over a lazy dog while spillway keeps every replica busy "
    "and no request is ever dropped on the floor "
)

TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 120, 160)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.8, 1, 2, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 400, 800)
ITL_BUCKETS: tuple[float, ...] = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025)
ITL_BUCKETS += (0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        for bound, count in zip(self.buckets, self.counts, strict=True):
            out.append(f'{name}_bucket{{{labels},le="{float(bound)}"}} {count}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {self.total}")
        return out


_WORD_LIST = _WORDS.split()


def words(start: int, count: int) -> str:
    return "".join(_WORD_LIST[i % len(_WORD_LIST)] + " " for i in range(start, start + count))


def count_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def text_tokens(text: str) -> list[str]:
    """``text`` as the tokens :func:`count_tokens` counts: four characters each."""
    return [text[i : i + 4] for i in range(0, len(text), 4)] or [""]


def chat_tokens(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Chat messages as tokens: four per message for its role, then its content's."""
    tokens: list[str] = []
    for message in messages:
        role = str(message.get("role", ""))
        tokens += ["<|im_start|>", f"<|role:{role}|>", "<|im_sep|>", "<|content|>"]
        tokens += text_tokens(str(message.get("content", "")))
    return tokens


def prefix_hashes(tokens: Sequence[Any], block_tokens: int) -> list[int]:
    """Hashes of the whole blocks of ``block_tokens`` tokens that ``tokens`` starts with, each
    chained over the ones before it (equal hash, equal prefix). BLAKE2b, so they are the same
    in every process (Python's ``hash`` is salted per process)."""
    hashes: list[int] = []
    previous = b""
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = json.dumps(list(tokens[start : start + block_tokens])).encode()
        previous = hashlib.blake2b(previous + block, digest_size=8).digest()
        hashes.append(int.from_bytes(previous, "big"))
    return hashes
