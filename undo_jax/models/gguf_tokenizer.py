"""Tokenizers from GGUF metadata alone, without torch.

transformers can build a tokenizer from a GGUF file, but its GGUF reader imports torch, which a
TPU VM or a runtime-only install does not have. This module reads the `tokenizer.*` metadata with
the `gguf` package and builds the same `tokenizers.Tokenizer` transformers would (tests check ids
against transformers' GGUF tokenizer), wrapped as a `PreTrainedTokenizerFast` carrying the GGUF's
chat template and special tokens.

Supported vocabularies (`tokenizer.ggml.model`):
- `gpt2`: byte-level BPE (SmolLM2, Qwen2/2.5/3, Llama 3), with the pre-tokenizer split the
  `tokenizer.ggml.pre` name stands for;
- `llama`: SentencePiece-style BPE with byte fallback (Llama 2 family; Gemma 2/3 with their own
  spelling of whitespace tokens).
Anything else is a one-line `GGUFError` naming the file and the kind.
"""

from __future__ import annotations

import functools

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPM_SPACE = "\u2581"

# Pre-tokenizer splits (regexes published with the models' own tokenizers) by `tokenizer.ggml.pre`.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_SPLITS = {
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
}
# Names whose split is GPT-2's own regex (ByteLevel's built-in one). SmolLM2's vocabulary has no merge
# across digits or across a space and a digit, so GPT-2's split gives the ids its own
# tokenizer (digits split one by one) gives.
_GPT2_REGEX_PRES = {None, "default", "gpt2", "smollm"}
_GEMMA_ARCHES = {"gemma", "gemma2", "gemma3"}


class GGUFTokenizerError(ValueError):
    """A GGUF file whose tokenizer we cannot build (a one-line message naming the file)."""


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE spells tokens in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _string_array(reader, key) -> list[str] | None:
    """A GGUF string array read straight from its memory-mapped parts (`contents()` is slow on 262k tokens)."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def _value(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_tokenizer_metadata(reader) -> dict:
    """The `tokenizer.*` keys a tokenizer build needs, as plain Python values."""
    token_type = reader.fields.get("tokenizer.ggml.token_type")
    scores = reader.fields.get("tokenizer.ggml.scores")
    return {
        "architecture": _value(reader, "general.architecture"),
        "model": _value(reader, "tokenizer.ggml.model"),
        "pre": _value(reader, "tokenizer.ggml.pre"),
        "tokens": _string_array(reader, "tokenizer.ggml.tokens"),
        "merges": _string_array(reader, "tokenizer.ggml.merges"),
        "token_type": None if token_type is None else [int(token_type.parts[i][0]) for i in token_type.data],
        "scores": None if scores is None else [float(scores.parts[i][0]) for i in scores.data],
        "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id"),
        "unk_token_id": _value(reader, "tokenizer.ggml.unknown_token_id"),
        "pad_token_id": _value(reader, "tokenizer.ggml.padding_token_id"),
        "add_bos_token": _value(reader, "tokenizer.ggml.add_bos_token"),
        "add_eos_token": _value(reader, "tokenizer.ggml.add_eos_token"),
        "chat_template": _value(reader, "tokenizer.chat_template"),
    }


def merges_from_scores(tokens: list[str], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    pieces, best-scoring token first (ties: longer left piece, then longer right piece, then piece ids)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in scores.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        pairs.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        found.extend((score, left, right) for left, right in pairs)
    # A stable descending sort on (score, len left, len right) keeps the id order inside ties.
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in found]


def _byte_level_bpe(meta: dict, where: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if meta["merges"] is None:
        raise GGUFTokenizerError(f"{where}: GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # Control tokens such as <|im_start|> may be stored in plain text; the BPE vocab needs byte spelling.
    vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    pre = meta["pre"]
    if pre in _BPE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_BPE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _GPT2_REGEX_PRES:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        known = sorted(p for p in (_GPT2_REGEX_PRES | set(_BPE_SPLITS)) if p)
        raise GGUFTokenizerError(f"{where}: unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
                                 f"supported: {', '.join(known)}")
    tok.decoder = decoders.ByteLevel()
    return tok, spelled


def _sentencepiece_bpe(meta: dict, where: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = list(meta["tokens"])
    gemma = meta["architecture"] in _GEMMA_ARCHES
    if gemma:
        # Gemma stores whitespace-run tokens as real spaces; its normalizer looks them up as U+2581 runs.
        tokens = [t.replace(" ", _SPM_SPACE) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta["merges"] is not None:
        merges = [tuple(m.split(" ")) for m in meta["merges"]]
    elif gemma:
        # Gemma's scores do not follow its merge order; the order of the tokens in the file does.
        merges = merges_from_scores(tokens, {t: -i for i, t in enumerate(tokens)})
    else:
        if meta["scores"] is None:
            raise GGUFTokenizerError(f"{where}: GGUF llama tokenizer has neither merges nor scores")
        if len(meta["scores"]) != len(tokens):
            raise GGUFTokenizerError(f"{where}: GGUF has {len(meta['scores'])} token scores for {len(tokens)} tokens")
        merges = merges_from_scores(tokens, dict(zip(tokens, meta["scores"], strict=True)))
    if gemma:
        unk = tokens[meta["unk_token_id"]] if meta["unk_token_id"] is not None else "<unk>"
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None,
                                   byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", _SPM_SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPM_SPACE, prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return tok, None


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def build_tokenizer(meta: dict, where: str):
    """The `tokenizers.Tokenizer` (with control and user-defined tokens added) for GGUF tokenizer metadata."""
    from tokenizers import AddedToken

    kind = meta["model"]
    if kind not in _BUILDERS:
        raise GGUFTokenizerError(f"{where}: unsupported GGUF tokenizer kind {kind!r} (tokenizer.ggml.model); "
                                 f"supported: {', '.join(sorted(_BUILDERS))}")
    if not meta["tokens"]:
        raise GGUFTokenizerError(f"{where}: GGUF metadata has no tokenizer.ggml.tokens")
    tok, spelled = _BUILDERS[kind](meta, where)
    types = meta["token_type"] or [1] * len(meta["tokens"])  # 1: NORMAL
    if len(types) != len(meta["tokens"]):
        raise GGUFTokenizerError(f"{where}: GGUF has {len(types)} token types for {len(meta['tokens'])} tokens")
    # Control tokens stay whole and are special. In a byte-level vocab a control token spelled outside the
    # byte alphabet is a converter mislabel, and adding it would grow the vocab past the model's rows.
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(meta["tokens"], types, strict=True)
               if ty == _CONTROL and (spelled is None or set(t) <= spelled)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(meta["tokens"], types, strict=True)
            if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    return tok


def load_gguf_tokenizer(path: str, reader=None):
    """A `PreTrainedTokenizerFast` built from a GGUF's metadata, with its chat template (no torch)."""
    from transformers import PreTrainedTokenizerFast

    if reader is None:
        from undo_jax.models.gguf_io import _reader

        reader = _reader(path)
    meta = read_tokenizer_metadata(reader)
    backend = build_tokenizer(meta, path)
    tokens = meta["tokens"]

    def token(key):
        i = meta[key]
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise GGUFTokenizerError(f"{path}: tokenizer.ggml.{key} = {i} is outside the vocabulary ({len(tokens)})")
        return tokens[int(i)]

    add_bos = meta["add_bos_token"]
    if add_bos is None:
        add_bos = meta["model"] == "llama"  # llama.cpp's default for a SentencePiece vocab that says nothing
    kwargs = dict(tokenizer_object=backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                  unk_token=token("unk_token_id"), pad_token=token("pad_token_id"),
                  add_bos_token=bool(add_bos), add_eos_token=bool(meta["add_eos_token"] or False))
    if meta["chat_template"]:
        kwargs["chat_template"] = meta["chat_template"]
    return PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})
