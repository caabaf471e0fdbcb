"""Mesh construction and logical-axis placement on 8 simulated CPU devices (see tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from undo_jax.models import CausalLM, ModelConfig
from undo_jax.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_model,
    spec_for_shape,
)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    base.update(overrides)
    return ModelConfig(**base)


def test_make_mesh_fills_the_free_axis():
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": len(jax.devices()), "tensor": 1}
    assert dict(make_mesh(data=-1, fsdp=1, devices=jax.devices()[:4]).shape) == {"data": 4, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("sizes", [dict(data=3, fsdp=-1), dict(data=-1, fsdp=-1), dict(data=2, fsdp=2, tensor=1),
                                   dict(data=0)])
def test_make_mesh_rejects_impossible_layouts(sizes):
    with pytest.raises(ValueError, match="make_mesh"):
        make_mesh(**sizes)


def test_logical_to_spec_maps_and_never_reuses_a_mesh_axis():
    assert logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("norm",)) == P(None)
    # heads and kv_heads both map to tensor: the second dimension must stay replicated.
    assert logical_to_spec(("heads", "kv_heads")) == P("tensor", None)
    rules = dict(DEFAULT_RULES, embed=("data", "fsdp"))
    assert logical_to_spec(("embed", "mlp"), rules) == P(("data", "fsdp"), "tensor")


def test_indivisible_dimension_falls_back_to_replication():
    mesh = make_mesh(fsdp=4, tensor=2)
    assert spec_for_shape((32, 6, 8), ("embed", "heads", "head_dim"), mesh) == P("fsdp", "tensor", None)
    assert spec_for_shape((30, 3, 8), ("embed", "heads", "head_dim"), mesh) == P(None, None, None)
    with pytest.raises(ValueError, match="logical_axes"):
        spec_for_shape((30, 3), ("embed", "heads", "head_dim"), mesh)


# Per-device block shapes, by hand from the rules (embed -> fsdp, heads/kv_heads/vocab -> tensor, a dimension the
# axis does not divide stays whole) for hidden 32, 4 heads, 2 kv heads, head_dim 8, vocab 96.
SHARD_SHAPES = {
    "fsdp4_tensor2": {"q_proj": (8, 2, 8), "k_proj": (8, 1, 8), "embed_tokens": (48, 8)},
    "data8": {"q_proj": (32, 4, 8), "k_proj": (32, 2, 8), "embed_tokens": (96, 32)},
    "tensor8": {"q_proj": (32, 4, 8), "k_proj": (32, 2, 8), "embed_tokens": (12, 32)},  # 4 and 2 heads: whole
}


@pytest.mark.parametrize("name, layout", [("fsdp4_tensor2", dict(fsdp=4, tensor=2)), ("data8", dict(data=8, fsdp=1)),
                                          ("tensor8", dict(fsdp=1, tensor=8))])
def test_sharded_model_matches_unsharded(name, layout):
    # kv_heads=2 does not divide by tensor=8: exercises the replication fallback inside a real model.
    config = tiny_config(tie_word_embeddings=False, attention_bias=True)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (8, 12), 0, config.vocab_size)
    forward = nnx.jit(lambda m, x: m(x))
    expected = np.asarray(forward(model, ids))

    mesh = make_mesh(**layout)
    shardings = param_shardings(model, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(nnx.state(model))
    shard_model(model, mesh)
    attn = model.layers.self_attn  # stacked over the layers: a leading, replicated [L] axis
    layers = config.num_hidden_layers
    for param, shape in SHARD_SHAPES[name].items():
        value = model.embed_tokens[...] if param == "embed_tokens" else attn[param][...]
        want = shape if param == "embed_tokens" else (layers, *shape)
        assert {s.data.shape for s in value.addressable_shards} == {want}, param
    for leaf, sharding in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sharding
    ids = jax.device_put(ids, batch_sharding(mesh))
    got = forward(model, ids)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)
    assert jnp.isfinite(got).all()
