"""The tiny pipelines' tokenizers, written from code: a byte-level CLIP BPE learned from an embedded corpus
of prompt words, a T5-style Unigram tokenizer and a Qwen2 BPE with FLUX.2 [klein]'s chat template."""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

from transformers import (
    CLIPTokenizer,
    Qwen2Tokenizer,
    T5Tokenizer,
)

MAX_TOKENS = 77
NUM_MERGES = 400
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_CORPUS = (
    """
a photo of sks dog. a photo of a dog. a photo of sks cat on the beach. a photo of a cat in the snow.
a photo of sks toy. a photo of a toy. a red toy on a wooden table. an orange toy in the grass.
a cute small dog sitting next to a tree. a fluffy cat sleeping on a soft blue chair.
a painting of a dog in the style of watercolor. an oil painting of a cat wearing a hat.
a drawing of a toy car on the street. a sketch of a house near a river at sunset.
a high quality photo of a person standing in front of a mountain lake.
a portrait of a woman with glasses, detailed, realistic, sharp focus.
a man riding a bike in the city at night with bright lights.
a child playing with a ball in the park on a sunny day.
a cartoon of a green frog jumping over a yellow flower in the garden.
a bowl of fruit on the kitchen table, apples, oranges and bananas.
a purple backpack on top of a white bed in a dark room.
a boat on the ocean under a cloudy sky, waves and sand.
a red car parked beside a forest road in autumn, golden leaves.
a teddy bear with a pink bow, plush, studio lighting, black background.
a robot made of shiny metal and glass, digital art, trending, render.
a vase with sunflowers, still life, canvas, brush strokes.
a castle on a hill, fantasy, epic, cinematic, wide angle.
a bird flying above the clouds, blue and orange colors, minimal.
a dog and a cat together in a basket, close up, macro, bokeh.
a toy robot inside a box, plastic, colorful, product shot.
"""
    + """
a photo of a small red circle on a blue background. a photo of a large green square on a yellow background.
a photo of a small blue triangle on a striped purple background. a photo of a large yellow star on a
checkered orange background. a photo of a small purple diamond on a speckled white background. a photo of
a large orange cross on a red background. a photo of a small white heart on a green background.
a photo of a large black toy on a striped blue background. a photo of sks toy on a checkered red background.
"""
    * 4
)


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    return dict(zip(printable + extra, map(chr, codes)))


def _corpus_words() -> Counter[tuple[str, ...]]:
    """Corpus words as byte-unicode symbol tuples, the last symbol carrying ``</w>``, with counts."""
    table = _byte_to_unicode()
    counts: Counter[tuple[str, ...]] = Counter()
    for word in re.findall(r"[a-z]+", _CORPUS.lower()):
        symbols = [table[b] for b in word.encode("utf-8")]
        counts[(*symbols[:-1], symbols[-1] + "</w>")] += 1
    return counts


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every adjacent occurrence of ``pair`` in ``word`` by the joined symbol."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@lru_cache(maxsize=1)
def _learn_merges(num_merges: int = NUM_MERGES) -> tuple[tuple[str, str], ...]:
    """Greedy BPE on the corpus: merge the most frequent pair, ties broken by the pair itself."""
    return _greedy_merges(_corpus_words(), num_merges)


def _greedy_merges(words: Counter[tuple[str, ...]], num_merges: int) -> tuple[tuple[str, str], ...]:
    """Greedy BPE on ``words`` (symbol tuples with counts): merge the most frequent pair, ties broken by
    the pair itself."""
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge_pair(w, best): c for w, c in words.items()})
    return tuple(merges)


def _tokenizer_files(folder: Path) -> None:
    """Write CLIP-layout ``vocab.json`` and ``merges.txt`` into ``folder``.

    Vocab order follows CLIP: 256 bytes, the same with ``</w>``, one token per merge, then the
    special tokens last (so the EOS id is the largest, which CLIP's argmax pooling relies on).
    """
    symbols = list(_byte_to_unicode().values())
    merges = _learn_merges()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer (~900 tokens) learned offline from the embedded corpus.

    ``tok(prompts, padding="max_length", max_length=77, truncation=True)`` gives ids of shape
    ``(B, 77)``: ``<|startoftext|>``, the BPE tokens, ``<|endoftext|>``, then ``<|endoftext|>`` padding.
    Its files are written once per process (:func:`_tokenizer_folder`); each call reads them.
    """
    return CLIPTokenizer.from_pretrained(
        _tokenizer_folder().name,
        model_max_length=MAX_TOKENS, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )  # fmt: skip


def _tokenizer_folder() -> tempfile.TemporaryDirectory:
    """The tokenizer's ``vocab.json`` and ``merges.txt`` in a temporary folder, written once per process
    (removed at exit), so that building the pipeline writes nothing more (a full disk fails a command at
    its own output, not here); rewritten if the folder was removed meanwhile."""
    folder = _TOKENIZER_FOLDER.get("folder")
    if folder is None or not (Path(folder.name) / "merges.txt").is_file():
        folder = tempfile.TemporaryDirectory(prefix="boft-tiny-tok-")
        _tokenizer_files(Path(folder.name))
        _TOKENIZER_FOLDER["folder"] = folder
    return folder


_TOKENIZER_FOLDER: dict[str, tempfile.TemporaryDirectory] = {}


TINY_T5_MAX_TOKENS = 64
"""``model_max_length`` of the T5-style tokenizer (pipelines pad to their ``max_sequence_length``)."""
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&+"


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces in T5's order (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), scored by log frequency.

    Every corpus word is one ``▁word`` piece; ``▁`` and single characters (score -20, below any word)
    spell out the rest.
    """
    import math

    words = Counter(re.findall(r"[a-z]+", _CORPUS.lower()))
    total = sum(words.values())
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -10.0)]
    pieces += [
        ("▁" + w, math.log(c / total)) for w, c in sorted(words.items(), key=lambda wc: (-wc[1], wc[0]))
    ]
    pieces += [(ch, -20.0) for ch in _T5_CHARS]
    return pieces


def build_tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5-style Unigram tokenizer (~300 pieces) built from code: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2.

    Like T5's SentencePiece tokenizer it splits on whitespace with ``▁`` word-start markers and appends
    ``</s>``; corpus words are single pieces, other words are spelled by characters. ``tok(prompts,
    padding="max_length", max_length=S, truncation=True)`` gives ids of shape ``(B, S)``: pieces,
    ``</s>``, then ``<pad>`` (0). No sentinel ``<extra_id_*>`` tokens (only the encoder is used).
    """
    return T5Tokenizer(
        vocab=_t5_vocab(),
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        model_max_length=TINY_T5_MAX_TOKENS,
    )


# --- FLUX.2 [klein]: Qwen3 prompts, a Flux.2 transformer on patchified, batch-norm-normalised latents ---
#
#   latents (B, 16, 16, 16) --2x2 patches, VAE batch norm--> (B, 64, 8, 8) --packed--> (B, 64 tokens, 64);
#   text: chat-templated prompt (B, 512) --Qwen3, hidden states 9, 18, 27 stacked--> (B, 512, 3 x 32)

QWEN_PAD, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_THINK = ("<think>", "</think>")
TINY_QWEN_MAX_TOKENS = 512
"""``model_max_length`` of the tiny Qwen tokenizer: FLUX.2 [klein]'s ``max_sequence_length``."""
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's chat template, reduced to plain messages: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then
the generation prompt with an empty think block when ``enable_thinking=False``."""


def _qwen_words() -> Counter[tuple[str, ...]]:
    """Corpus words as GPT-2 byte-level symbol tuples with the leading space (``Ġword``), with counts."""
    table = _byte_to_unicode()
    return Counter(
        tuple(table[b] for b in f" {word}".encode()) for word in re.findall(r"[a-z]+", _CORPUS.lower())
    )


@lru_cache(maxsize=1)
def _qwen_merges() -> tuple[tuple[str, str], ...]:
    return _greedy_merges(_qwen_words(), NUM_MERGES)


def build_tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer (~700 tokens) built from code, merges learned from the corpus.

    As Qwen's: GPT-2 byte-level pieces (every corpus word with its leading space is one ``Ġword`` token),
    Qwen's pre-tokenizer, ``<|endoftext|>`` padding (right), ``<|im_end|>`` as end of sequence, the chat
    tokens ``<|im_start|>`` / ``<|im_end|>`` and ``<think>`` / ``</think>``, and a reduced Qwen3 chat template
    (:data:`QWEN_CHAT_TEMPLATE`) that ``apply_chat_template(..., enable_thinking=False)`` accepts.
    """
    merges = _qwen_merges()
    tokens = [*_byte_to_unicode().values(), *("".join(m) for m in merges)]
    tokens += [QWEN_PAD, QWEN_IM_START, QWEN_IM_END, *QWEN_THINK]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        eos_token=QWEN_IM_END,
        pad_token=QWEN_PAD,
        extra_special_tokens=[QWEN_IM_START, QWEN_IM_END],
        model_max_length=TINY_QWEN_MAX_TOKENS,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens(list(QWEN_THINK))
    return tokenizer
