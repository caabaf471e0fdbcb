"""ModelConfig from/to Hugging Face config.json: both rope forms, round trips, and what transformers reads back."""

from __future__ import annotations

import json

import pytest
import transformers

from tests.models.reference import KINDS, LLAMA3_ROPE, TINY
from undo_jax.models import ConfigError, ModelConfig


def _hf_dict(kind: str) -> dict:
    cls_name, kwargs = KINDS[kind]
    return getattr(transformers, cls_name)(**TINY, **kwargs).to_dict()


def _old_form(new: dict) -> dict:
    """The pre-transformers-5 spelling of the same config: top-level rope_theta and rope_scaling."""
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rope = dict(new["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = None if rope.get("rope_type") == "default" else {**rope, "type": rope.pop("rope_type")}
    return old


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_transformers_config_parses(kind):
    d = _hf_dict(kind)
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.model_type == d["model_type"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.head_dim == (24 if kind == "qwen3" else 16)
    assert cfg.tie_word_embeddings == d["tie_word_embeddings"]
    assert cfg.attention_bias == kind.startswith("qwen2")
    assert cfg.qk_norm == (kind == "qwen3")
    assert cfg.rope_theta == d["rope_parameters"]["rope_theta"]
    if kind == "llama3":
        assert cfg.rope_scaling["rope_type"] == "llama3"
        assert cfg.rope_scaling["factor"] == LLAMA3_ROPE["factor"]
    else:
        assert cfg.rope_scaling is None


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_old_and_new_rope_forms_parse_equal(kind):
    new = _hf_dict(kind)
    old = _old_form(new)
    assert "rope_parameters" not in old and "rope_theta" in old
    a, b = ModelConfig.from_hf_dict(new), ModelConfig.from_hf_dict(old)
    assert a.rope_theta == b.rope_theta
    # The scaling dicts differ only in the key spelling of the type; everything the decoder reads is equal.
    if kind == "llama3":
        norm = lambda s: {k: v for k, v in s.items() if k not in ("type", "rope_type")}  # noqa: E731
        assert norm(a.rope_scaling) == norm(b.rope_scaling)
        assert a.replace(rope_scaling=None) == b.replace(rope_scaling=None)
    else:
        assert a == b


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_to_hf_dict_round_trips(kind):
    cfg = ModelConfig.from_hf_dict(_hf_dict(kind))
    out = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(out))) == cfg
    # transformers reads our dict into the same architecture.
    hf = transformers.AutoConfig.for_model(**out)
    assert type(hf).__name__ == KINDS[kind][0]
    assert hf.head_dim == cfg.head_dim and hf.tie_word_embeddings == cfg.tie_word_embeddings
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf.rope_parameters["rope_type"] == ("llama3" if kind == "llama3" else "default")
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg


def test_unmodelled_keys_are_carried_through():
    d = _hf_dict("llama") | {"initializer_range": 0.123, "custom_key": [1, 2]}
    out = ModelConfig.from_hf_dict(d).to_hf_dict(dtype="bfloat16")
    assert out["initializer_range"] == 0.123 and out["custom_key"] == [1, 2]
    assert out["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "mamba"}, "unsupported model_type 'mamba'"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "unsupported rope scaling"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_size": "wide"}, "malformed value"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    d = _hf_dict("llama") | change
    with pytest.raises(ConfigError, match=message) as err:
        ModelConfig.from_hf_dict(d, where="some/dir/config.json")
    assert str(err.value).startswith("some/dir/config.json: ") and "\n" not in str(err.value)


def test_missing_key_names_key_and_file(tmp_path):
    d = _hf_dict("qwen3")
    del d["hidden_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="hidden_size") as err:
        ModelConfig.from_json_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_unreadable_config_json_names_file(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        ModelConfig.from_json_file(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
