"""generate_distributed in one process (8 simulated devices): the same results as `generate` on the same mesh.

The two-process behaviour (gathering rows from the other process, refusing different prompt lists)
is covered by test_two_processes.py.
"""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from tests.multihost.worker import PROMPTS, char_tokenizer, tiny_llama
from undo_jax.sampling import generate
from undo_jax.sampling.distributed_eval import data_parallel_mesh, generate_distributed, model_mesh
from undo_jax.sharding import make_mesh, shard_model


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_default_mesh_is_every_device_on_data_and_params_are_placed_on_it(tokenizer):
    model = tiny_llama(seed=1)
    assert model_mesh(model) is None  # plain arrays, on no mesh yet
    got = generate_distributed(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=8)
    mesh = data_parallel_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert model_mesh(model) == mesh
    assert all(isinstance(x.sharding, NamedSharding) and x.sharding.is_fully_replicated
               for x in jax.tree.leaves(nnx.state(model)))
    assert got == generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=8, mesh=mesh)
    assert len(got) == len(PROMPTS) and len({c.token_ids for (c,) in got}) > 1


def test_sampled_generation_equals_generate_on_the_models_own_mesh(tokenizer):
    model = tiny_llama(seed=2)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shard_model(model, mesh)
    assert model_mesh(model) == mesh
    kwargs = dict(max_new_tokens=6, temperature=1.0, num_samples=2, seed=3, batch_size=8)
    got = generate_distributed(model, tokenizer, PROMPTS, **kwargs)
    assert got == generate(model, tokenizer, PROMPTS, mesh=mesh, **kwargs)
    assert all(len(samples) == 2 for samples in got)
