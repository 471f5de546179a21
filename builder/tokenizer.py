"""Train a tiny byte-level BPE tokenizer locally, for test fixtures.

Fixtures must never download anything, yet the tokenizer they ship has to behave like a real one
(byte-level BPE, special tokens at the end of the vocabulary as in Qwen / DeepSeek, loadable by
`transformers.AutoTokenizer`). We therefore train one in well under a second on a corpus every
Python installation already has: the standard library's own source files.
"""

from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen2/Qwen3's pre-tokenisation regex. Using the same pipeline as transformers' `Qwen2Tokenizer` means
# that class rebuilds exactly this tokenizer from our vocab and merges when it loads the folder.
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Enough text for ~1000 merges, small enough to train in a fraction of a second.
_MAX_FILES = 200
_MAX_CHARS_PER_FILE = 16_384

QWEN3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


def _stdlib_corpus(seed: int) -> list[str]:
    """A deterministic slice of the standard library's top-level modules.

    Only the top level: sub-folders include `site-packages`, whose contents differ per install.
    The seed only reorders which files fill the slice, so a given seed always sees the same text.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    random.Random(seed).shuffle(files)
    return [f.read_text(encoding="utf-8", errors="replace")[:_MAX_CHARS_PER_FILE] for f in files[:_MAX_FILES]]


def _build_tokenizer() -> Tokenizer:
    bpe = models.BPE(
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    out_dir: Path,
    vocab_size: int,
    special_tokens: list[str],
    seed: int = 0,
    *,
    eos_token: str | None = None,
    pad_token: str | None = None,
    bos_token: str | None = None,
    model_max_length: int = 2048,
    tokenizer_class: str = "Qwen2Tokenizer",
    corpus: Iterable[str] | None = None,
) -> Path:
    """Train and save `tokenizer.json` + `tokenizer_config.json` in `out_dir`; return tokenizer.json's path.

    The total vocabulary (BPE tokens + `special_tokens`) is at most `vocab_size`; the special tokens get
    the LAST ids, as in real checkpoints, so callers must look ids up (see `special_token_ids`).
    `eos_token` and `pad_token` default to `special_tokens[0]`. `bos_token` defaults to none (Qwen style);
    when given, encoding prepends it (DeepSeek style). `corpus` replaces the default text (a seeded slice of
    the standard library's top-level modules), e.g. with the train split of a model that is really trained.
    """
    if not special_tokens:
        raise ValueError("special_tokens must not be empty (eos/pad default to the first one)")
    # 256 byte symbols are always in the alphabet, so the merges need some room above them.
    n_bpe = vocab_size - len(special_tokens)
    if n_bpe <= 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges above the 256 byte symbols")
    eos_token = eos_token or special_tokens[0]
    pad_token = pad_token or special_tokens[0]
    for name, token in (("eos_token", eos_token), ("pad_token", pad_token), ("bos_token", bos_token)):
        if token is not None and token not in special_tokens:
            raise ValueError(f"{name} {token!r} is not one of special_tokens {special_tokens}")

    tok = _build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_stdlib_corpus(seed) if corpus is None else corpus, trainer=trainer)
    tok.add_special_tokens(special_tokens)
    if bos_token is not None:
        # DeepSeek style: encoding prepends BOS. The post-processor does it for both `tokenizers` and
        # transformers (which ignores `add_bos_token` for tokenizer.json-backed tokenizers).
        bos = (bos_token, tok.token_to_id(bos_token))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1", special_tokens=[bos]
        )
    if tok.get_vocab_size() > vocab_size:
        raise AssertionError(f"trained tokenizer has {tok.get_vocab_size()} tokens > vocab_size {vocab_size}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.json"
    tok.save(str(tokenizer_path))

    added_tokens_decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in special_tokens
    }
    named = (eos_token, pad_token, bos_token)
    config = {
        "add_bos_token": bos_token is not None,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [t for t in special_tokens if t not in named],
        "bos_token": bos_token,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "split_special_tokens": False,
        "tokenizer_class": tokenizer_class,
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return tokenizer_path


def special_token_ids(tokenizer_path: Path, tokens: list[str]) -> dict[str, int]:
    """Look up token ids in a saved tokenizer.json; raise if a token is missing."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    ids: dict[str, int] = {}
    for t in tokens:
        token_id = tok.token_to_id(t)
        if token_id is None:
            raise KeyError(f"{t!r} is not in {tokenizer_path}")
        ids[t] = token_id
    return ids


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
