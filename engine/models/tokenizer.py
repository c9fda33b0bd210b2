"""An offline CLIP tokenizer for the random-weight presets.

No model hub is reachable where the tiny/small presets run, so their ``CLIPTokenizer`` is built
from a vocabulary generated here: CLIP's byte-level alphabet (each of the 256 byte symbols, alone
and as a word end ``</w>``), the merges of a small fixed word list, and the special tokens.
Tokenization therefore follows exactly CLIP's BPE algorithm (lower-casing, whitespace/punctuation
splitting, ``</w>`` word ends, 77-token context, ``<|startoftext|>``/``<|endoftext|>``); only the
vocabulary is smaller. The ``sd15`` preset loads the real tokenizer with the checkpoint.
"""

from __future__ import annotations

import functools

from transformers import AddedToken, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Words that get whole-word merges so common prompt words are one token (keeps sequences short).
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "and",
    "woman",
    "man",
    "person",
    "girl",
    "boy",
    "dancing",
    "dance",
    "dress",
    "shirt",
    "jacket",
    "red",
    "blue",
    "green",
    "black",
    "white",
    "yellow",
    "pink",
    "beach",
    "street",
    "stage",
    "studio",
    "city",
    "park",
    "room",
    "forest",
    "hair",
    "face",
    "wearing",
    "standing",
    "full",
    "body",
    "photo",
    "high",
    "quality",
    "detailed",
    "realistic",
    "background",
    "sks",
    "character",
    "lowres",
    "bad",
    "anatomy",
    "blurry",
    "deformed",
]


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # Merge left to right: ((w o) m) … then the word end, as CLIP's BPE applies them.
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for nxt in symbols[1:]:
            merged = current + nxt
            merge = (current, nxt)
            if merge not in merges:
                merges.append(merge)
            if merged not in tokens:
                tokens.append(merged)
            current = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=4)
def build_offline_tokenizer(extra_words: tuple[str, ...] = ()) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` built without network access (vocab of a few hundred tokens).

    ``extra_words`` become whole-word tokens (added tokens matched as single words, case-blind)
    with ids after the base vocabulary, which is left as it is: the ``micro`` preset adds the
    refiner's words so a refined prompt fits the 77-token window as with CLIP's real vocabulary.
    """
    vocab, merges = _vocab_and_merges()
    # transformers 5 takes (a, b) merge pairs here; its annotation says list[str].
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]
    if extra_words:
        tok.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in extra_words])
    return tok


def clip_text_encoder(tokenizer: CLIPTokenizer, text: dict[str, int]) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder over ``tokenizer``'s vocabulary (77 positions);
    ``text`` gives ``hidden_size``, ``intermediate_size``, ``num_hidden_layers`` and ``heads``."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["heads"],
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
