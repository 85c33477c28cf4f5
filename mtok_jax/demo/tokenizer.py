"""Write a tiny CLIP-format BPE tokenizer folder whose vocabulary covers a given word list.

Layout (what ``transformers.CLIPTokenizer.from_pretrained`` reads): ``vocab.json``, ``merges.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``. Like the real CLIP vocabulary: ids 0..255 are the
256 byte symbols (GPT-2 byte→unicode map), 256..511 their ``</w>`` (end-of-word) forms, then one id per
merge result, then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids; padding is EOS
(as SD-1.x), ``model_max_length`` 77.

Every pre-token of the given strings (CLIP pre-tokenisation: lower case, then letters runs / single
digits / punctuation runs) becomes exactly one token: merges are added greedily, each appended with the
lowest priority, so words added earlier keep their single-token encoding.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import regex
from transformers.models.clip.tokenization_clip import bytes_to_unicode

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# CLIP's pre-tokenisation pattern (letters runs, single digits, punctuation runs, English clitics).
_PRETOKEN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def pretokens(text: str, exclude: Sequence[str] = ("<*>",)) -> list[str]:
    """Lower-cased CLIP pre-tokens of ``text`` (added tokens in ``exclude`` are split out first)."""
    for token in exclude:
        text = text.replace(token, " ")
    return _PRETOKEN.findall(" ".join(text.lower().split()))


def _bpe(symbols: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP BPE: repeatedly merge (all occurrences of) the best-ranked adjacent pair."""
    word = symbols
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return word


def _symbols(pretoken: str, byte_encoder: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_encoder[b] for b in pretoken.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def build_vocab(words: Iterable[str], exclude: Sequence[str] = ("<*>",)) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab {token: id}, merges in rank order) covering every pre-token of ``words`` as one token."""
    byte_encoder = bytes_to_unicode()
    base = list(byte_encoder.values())
    vocab: dict[str, int] = {}
    for token in base + [b + "</w>" for b in base]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for text in words:
        for pretoken in pretokens(text, exclude):
            symbols = _symbols(pretoken, byte_encoder)
            word = _bpe(symbols, ranks)
            while len(word) > 1:
                pair = (word[0], word[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                word = _bpe(symbols, ranks)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(directory: str | os.PathLike, words: Iterable[str],
                         exclude: Sequence[str] = ("<*>",)) -> int:
    """Write the tokenizer folder for ``words`` (any strings: labels, prompts); returns the vocab size."""
    vocab, merges = build_vocab(words, exclude)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
              "clean_up_tokenization_spaces": True}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(vocab)
