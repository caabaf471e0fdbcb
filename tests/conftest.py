"""Shared test setup: 8 simulated CPU devices (set before jax is imported) and asset fixtures."""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
# Add the device count to any XLA_FLAGS already set (setdefault would drop it, and the sharded-equality
# tests would then skip or test nothing); a conflicting count is caught by the session check below.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("UNDO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
EXPECTED_DEVICES = 8


def device_count_problem() -> str | None:
    """None when jax sees the 8 devices the suite is written for, else why not (one line)."""
    import jax

    n = jax.device_count()
    if n == EXPECTED_DEVICES:
        return None
    return (f"the tests need {EXPECTED_DEVICES} devices, jax sees {n} ({jax.default_backend()}; "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r})")


def pytest_sessionstart(session):
    problem = device_count_problem()
    if problem is not None:
        raise pytest.UsageError(problem)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled executables after each test module.

    Each XLA CPU executable keeps about three memory mappings; the whole suite in one process compiles enough
    programs to approach the kernel's vm.max_map_count (65530), where XLA segfaulted while compiling late in the
    suite (twice, in different tests that pass alone). Clearing the caches returns the mappings.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    from undo_jax.assets import gemma3_270m_gguf_path

    try:
        return gemma3_270m_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from undo_jax.assets import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
