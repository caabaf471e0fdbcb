"""undo_jax.distributed across two real processes started from the environment, and its one-process cases."""

from __future__ import annotations

import jax
import pytest

from tests.multihost.harness import WorkerFailure, run_all
from undo_jax import distributed


def test_two_processes_started_from_the_environment_gather_and_agree(tmp_path):
    result = run_all({"helpers": {"num_processes": 2, "devices_per_process": 2, "init_from_env": True,
                                  "module": "tests.multihost.helpers_worker"}}, tmp_path, timeout_s=300)["helpers"]
    if isinstance(result, WorkerFailure):
        raise result
    for process_index, report in enumerate(result):
        assert report["started"] is True
        assert (report["process_index"], report["process_count"]) == (process_index, 2)
        assert report["some_param_split_across_processes"]  # the gather had something to do
        assert report["host_copy_is_numpy"] and report["host_copy_equal"]
        assert report["decided_true"] is True and report["decided_false"] is False
    # generate_distributed placed a model that was on no mesh onto both processes' devices.
    from tests.multihost.worker import MAX_NEW_TOKENS, PROMPTS, char_tokenizer, tiny_llama
    from undo_jax.sampling.distributed_eval import generate_distributed

    here = generate_distributed(tiny_llama(seed=6), char_tokenizer(), PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
    assert result[0]["fresh_model_generation"] == [list(c.token_ids) for (c,) in here]
    assert result[1]["fresh_model_generation"] == result[0]["fresh_model_generation"]


def test_host_copy_of_a_local_model_is_the_model_itself():
    from tests.multihost.worker import tiny_llama

    model = tiny_llama()
    assert distributed.host_copy(model) is model
    assert distributed.primary_decides(True) is True and distributed.primary_decides(False) is False


@pytest.mark.parametrize(("variables", "message"), [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID must be an integer"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be an integer"),
])
def test_a_coordinator_in_the_environment_needs_the_process_count_and_id(monkeypatch, variables, message):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.maybe_initialize()
    assert not jax.distributed.is_initialized()

