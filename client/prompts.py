"""Built-in prompt sets for benchmarks: code (where drafters shine) and chat-like text."""

from __future__ import annotations

import sysconfig
from pathlib import Path

CHAT = [
    "Explain in simple terms why the sky is blue.",
    "Write a short note to a colleague asking to move our meeting to Thursday.",
    "What are three good habits for staying focused while working from home?",
    "Summarise the plot of a detective story in two sentences.",
    "Give me a recipe idea that uses rice, eggs and spinach.",
    "How do I politely decline an invitation to a party?",
    "Describe the difference between weather and climate.",
    "What should I pack for a weekend hiking trip?",
    "Tell me a fun fact about octopuses.",
    "Why do people enjoy listening to sad music?",
    "Suggest a name for a small bakery by the sea.",
    "How can I explain recursion to a ten-year-old?",
    "What is the best way to learn a new language as an adult?",
    "Write a haiku about a rainy morning.",
    "List some questions to ask at the end of a job interview.",
    "Compare trains and planes for a 500 km journey.",
]


def code(count: int = 32, chars: int = 300) -> list[str]:
    """Openings of functions from the standard library's packages (their signatures and docstrings)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts: list[str] = []
    for package in ("json", "email", "http", "logging", "importlib", "xml/dom", "urllib", "concurrent/futures"):
        for path in sorted((stdlib / package).glob("*.py")):
            text = path.read_text(errors="replace")
            start = text.find("\ndef ")
            if start >= 0:
                prompts.append(text[start + 1: start + 1 + chars])
            if len(prompts) >= count:
                return prompts
    return prompts


def load(name_or_file: str) -> list[str]:
    """`code`, `chat`, or a file: a JSON list of strings or one prompt per line."""
    if name_or_file == "code":
        return code()
    if name_or_file == "chat":
        return list(CHAT)
    path = Path(name_or_file)
    text = path.read_text()
    if path.suffix == ".json":
        import json

        prompts = json.loads(text)
        if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return prompts
    return [line for line in text.splitlines() if line.strip()]
