"""GGUF tokenizers built without torch (undo_jax.models.gguf_tokenizer) against transformers' GGUF tokenizer."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import transformers

from undo_jax.models import gguf_tokenizer
from undo_jax.models.gguf_tokenizer import GGUFTokenizerError, load_gguf_tokenizer

REPO = Path(__file__).resolve().parents[2]

UNICODE = [
    "naïve café, façade, jalapeño, Zürich — “quoted” ‘text’ … ½ ≤ ∑ ∞ ≠ ±",
    "日本語のテキストと漢字、ひらがな、カタカナ。",
    "中文句子：三个苹果加上五个苹果等于八个苹果。",
    "Русский текст: у Маши было 5 яблок.",
    "العربية: لدى أحمد ثلاث تفاحات",
    "हिन्दी में एक वाक्य। 12 + 7 = 19",
    "emoji 🤖🧮👍🏽 and ZWJ 👩‍👩‍👧 flags 🇫🇷",
    "한국어 문장입니다. 사과 3개",
    "Ελληνικά: α + β = γ, π ≈ 3.14159",
    "mixed\ttabs\r\nCRLF  double  spaces   triple\u00a0nbsp\u2009thin",
    "   leading and trailing spaces   ",
    "\n\nnewlines only at the start",
]


def _code_snippets() -> list[str]:
    """Real code: the first lines of this package's own modules."""
    files = sorted((REPO / "undo_jax").rglob("*.py"))[:15]
    return [f.read_text(encoding="utf-8")[:600] for f in files]


def _jsonl(path: Path, key, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in itertools.islice(f, n)]
    return [key(r) for r in rows]


def real_texts(shared_data: Path) -> list[str]:
    texts = _jsonl(shared_data / "svamp" / "svamp.jsonl", lambda r: f"{r['Body']} {r['Question']}", 60)
    texts += _jsonl(shared_data / "gsm8k" / "test.jsonl", lambda r: r["question"], 50)
    texts += _jsonl(shared_data / "gsm8k" / "train.jsonl", lambda r: r["answer"], 20)  # '<<48/2=24>>' calculator marks
    texts += _jsonl(shared_data / "math" / "test.jsonl", lambda r: r["problem"], 30)
    texts += _jsonl(shared_data / "math" / "train.jsonl", lambda r: r["solution"], 20)  # LaTeX, [asy] code
    return texts + _code_snippets() + UNICODE


def conversations(shared_data: Path) -> list[list[dict]]:
    qs = _jsonl(shared_data / "gsm8k" / "test.jsonl", lambda r: (r["question"], r["answer"]), 20)
    convs = []
    for i, (q, a) in enumerate(qs):
        conv = [{"role": "user", "content": q}]
        if i % 2 == 0:
            conv.insert(0, {"role": "system", "content": "You are a careful math tutor. End with 'The answer is N.'"})
        if i % 3 == 0:
            conv += [{"role": "assistant", "content": a}, {"role": "user", "content": "Check it again."}]
        convs.append(conv)
    return convs


def _theirs(path: str):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _assert_same_tokenizer(ours, theirs, texts, convs):
    assert len(texts) >= 150
    for i, text in enumerate(texts):
        for special in (True, False):
            a = ours(text, add_special_tokens=special)["input_ids"]
            b = theirs(text, add_special_tokens=special)["input_ids"]
            assert a == b, f"text {i} (add_special_tokens={special}) {text[:60]!r}: ids differ\nours   {a}\ntheirs {b}"
        ids = ours(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == text, f"text {i}: decode(encode(x)) != x"
        assert ours.decode(ids) == theirs.decode(ids)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(ours) == len(theirs)
    # Special added tokens (what decode(skip_special_tokens=True) drops); all_special_ids would also list
    # class defaults such as GemmaTokenizer's mask_token, which no GGUF key names.
    special = lambda t: {i for i, a in t.added_tokens_decoder.items() if a.special}  # noqa: E731
    assert special(ours) == special(theirs)
    if theirs.chat_template is None:
        assert ours.chat_template is None
        return len(texts)
    for conv in convs:
        for gen in (True, False):
            a = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            b = theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert a == b
            assert ours(a, add_special_tokens=False)["input_ids"] == theirs(b, add_special_tokens=False)["input_ids"]
    return len(texts) + len(convs)


@pytest.mark.slow  # two tokenizer builds and ~440 encodings: ~15 s
def test_smollm2_tokenizer_matches_transformers(smollm2_gguf, shared_data):
    n = _assert_same_tokenizer(load_gguf_tokenizer(smollm2_gguf), _theirs(smollm2_gguf),
                               real_texts(shared_data), conversations(shared_data))
    assert n >= 200


@pytest.mark.slow  # a 262k-token vocabulary: ~40 s for both builds
def test_gemma3_tokenizer_matches_transformers(gemma3_gguf, shared_data):
    ours = load_gguf_tokenizer(gemma3_gguf)
    assert ours.add_bos_token and ours("2 apples").input_ids[0] == ours.bos_token_id
    # The base model's GGUF has no chat template: conversations are written in Gemma's turn format by hand,
    # so the control tokens are exercised inside text.
    turns = ["".join(f"<start_of_turn>{'model' if m['role'] == 'assistant' else 'user'}\n{m['content']}<end_of_turn>\n"
                     for m in conv) for conv in conversations(shared_data)]
    texts = real_texts(shared_data) + turns
    assert _assert_same_tokenizer(ours, _theirs(gemma3_gguf), texts, []) >= 200
    assert ours.convert_tokens_to_ids("<start_of_turn>") in ours(turns[0])["input_ids"]


# --- tiny synthetic GGUFs: the SentencePiece path of Llama-2-style files, and bad metadata ------------------

_SPM_PIECES = ["▁", "a", "b", "c", "d", "e", "h", "l", "o", "t", "w", "r", "1", "2", "▁a", "▁t", "he", "▁the", "ll",
               "llo", "▁he", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "ab", "▁ab", "12"]


def write_tokenizer_gguf(path: Path, *, model="llama", arch="llama", pre=None, merges=None, template=None,
                         add_bos=None, tokens=None, scores=None):
    """A metadata-only llama GGUF (one tiny tensor) whose tokenizer is described the way llama.cpp writes it."""
    import gguf

    if tokens is None:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SPM_PIECES
        types = [2, 3, 3] + [6] * 256 + [1] * len(_SPM_PIECES)
        scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(_SPM_PIECES))]
    else:
        types = [1] * len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(1 if len(tokens) > 1 else 0)
    w.add_eos_token_id(2 if len(tokens) > 2 else 0)
    w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_TEXTS = ["hello world", "the world", " hello  the", "abc 12 d", "hello\nworld", "q x z", "ünï 🤖", "", "ab12"]


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    path = str(write_tokenizer_gguf(tmp_path / "spm.gguf", template="{{ messages[0]['content'] }}"))
    ours, theirs = load_gguf_tokenizer(path), _theirs(path)
    assert ours.add_bos_token  # a llama SentencePiece vocab that says nothing gets BOS, as in llama.cpp
    for text in SPM_TEXTS:
        a, b = ours(text)["input_ids"], theirs(text)["input_ids"]
        assert a == b, f"{text!r}: {a} vs {b}"
        assert ours.decode(a, skip_special_tokens=True) == theirs.decode(b, skip_special_tokens=True)
    # Merges come from the scores: "▁hello" is one piece, and unknown characters fall back to bytes.
    vocab = ours.get_vocab()
    assert ours("hello", add_special_tokens=False)["input_ids"] == [vocab["▁hello"]]
    assert ours("q", add_special_tokens=False)["input_ids"] == [vocab["▁"], vocab["<0x71>"]]
    assert ours.chat_template == "{{ messages[0]['content'] }}"


def test_add_bos_flag_is_honoured(tmp_path):
    path = str(write_tokenizer_gguf(tmp_path / "nobos.gguf", add_bos=False))
    ours = load_gguf_tokenizer(path)
    assert ours("hello")["input_ids"] == _theirs(path)("hello")["input_ids"]
    assert ours("hello")["input_ids"][0] != ours.bos_token_id


def test_merges_from_scores_orders_by_score_then_length():
    from transformers.tokenization_utils_base import generate_merges

    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = {"ab": -1.0, "bc": -2.0, "abc": -0.5, "a": 0, "b": 0, "c": 0}
    # "abc" (best score) splits as ab+c and a+bc: the longer left piece first; then ab, then bc.
    merges = gguf_tokenizer.merges_from_scores(tokens, scores)
    assert merges == [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]
    assert merges == generate_merges({t: i for i, t in enumerate(tokens)}, scores)


@pytest.mark.parametrize("model,pre,match", [
    ("bert", None, r"unsupported GGUF tokenizer kind 'bert' \(tokenizer.ggml.model\)"),
    ("gpt2", "some-new-pre", r"unsupported GGUF pre-tokenizer 'some-new-pre'"),
])
def test_unsupported_tokenizer_is_one_line_error_naming_the_file(tmp_path, model, pre, match):
    path = str(write_tokenizer_gguf(tmp_path / "bad.gguf", model=model, pre=pre, tokens=["a", "b", "ab"],
                                    merges=["a b"]))
    with pytest.raises(GGUFTokenizerError, match=match) as info:
        load_gguf_tokenizer(path)
    assert str(info.value).startswith(path) and "\n" not in str(info.value)


def test_byte_level_gguf_matches_transformers(tmp_path):
    # A tiny Qwen2-style byte-level vocab: the qwen2 split keeps digits apart.
    alphabet = gguf_tokenizer._byte_alphabet()
    base = sorted(set(alphabet.values()))
    merged = ["Ġt", "he", "Ġthe", "12"]
    path = str(write_tokenizer_gguf(tmp_path / "bpe.gguf", model="gpt2", arch="qwen2", pre="qwen2",
                                    tokens=base + merged, merges=["Ġ t", "h e", "Ġt he", "1 2"]))
    ours, theirs = load_gguf_tokenizer(path), _theirs(path)
    for text in ["the 123 the", "x12y", "über the\n\n  the", "🤖 12"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == text
    assert "12" not in ours.convert_ids_to_tokens(ours("x12")["input_ids"])  # qwen2 splits digits one by one


_NO_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now raises ImportError
    import numpy as np
    import undo_jax.main, undo_jax.evaluate, undo_jax.teachers  # the entry points import cleanly
    from undo_jax.models import load_pretrained, load_tokenizer
    from undo_jax.sampling import generate
    tok = load_tokenizer(sys.argv[1])
    model = load_pretrained(sys.argv[1])
    out = generate(model, tok, [[{"role": "user", "content": "What is 2 + 3?"}]], max_new_tokens=6, batch_size=1)
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
    print("TOKENS", tok("Tom has 3 apples.")["input_ids"])
    print("OK", len(out))
""")


@pytest.mark.slow  # loads and runs the 135M model in a fresh process: ~40 s
def test_gguf_student_runs_without_torch(smollm2_gguf):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, smollm2_gguf], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 1" in proc.stdout
    ids = json.loads(proc.stdout.split("TOKENS ", 1)[1].splitlines()[0])
    assert ids == _theirs(smollm2_gguf)("Tom has 3 apples.")["input_ids"]
