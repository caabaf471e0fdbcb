"""Teachers: one interface over Gemini, OpenAI-compatible servers, a local JAX checkpoint and the
offline reference teacher; with a persistent response cache and a cost ledger."""

from undo_jax.teachers.base import AsyncAPITeacher, Teacher
from undo_jax.teachers.cache import ResponseCache, cache_key
from undo_jax.teachers.ledger import CostLedger
from undo_jax.teachers.types import SampleResult, TeacherCallError, TeacherRequest, TeacherResponse

TEACHER_NAMES = ("gemini", "openai", "local", "reference")


def teacher_options(config) -> dict:
    """The constructor options of the backend `config` (an `undo_jax.config.TeacherConfig`) names."""
    prices = {"price_input_per_mtok": config.price_input, "price_output_per_mtok": config.price_output}
    api = {"concurrency": config.concurrency, "rpm": config.rpm, "tpm": config.tpm, **prices}
    if config.backend == "reference":
        return {}
    if config.backend == "local":
        return {"model_path": config.model, **prices}
    options = dict(api)
    if config.model:
        options["model"] = config.model
    if config.base_url:
        options["base_url"] = config.base_url
    if config.backend == "gemini":
        options["thinking_budget"] = config.thinking_budget
        options["batch_mode"] = config.batch_api
    elif config.api_key_env:
        options["api_key_env"] = config.api_key_env
    return options


def make_teacher(config, *, cache_path: str | None = None, **options) -> Teacher:
    """Build a teacher from a `TeacherConfig` (or a backend name: gemini|openai|local|reference); `options` go
    to its constructor, over those of the config."""
    if isinstance(config, str):
        name = config
    else:
        name, options = config.backend, {**teacher_options(config), **options}
    if name == "gemini":
        from undo_jax.teachers.gemini import GeminiTeacher as cls
    elif name == "openai":
        from undo_jax.teachers.openai_compat import OpenAITeacher as cls
    elif name == "local":
        from undo_jax.teachers.local import LocalTeacher as cls
    elif name == "reference":
        from undo_jax.teachers.reference import ReferenceTeacher as cls
    else:
        raise ValueError(f"make_teacher: unknown teacher {name!r}; expected one of {', '.join(TEACHER_NAMES)}")
    return cls(cache_path=cache_path, **options)


__all__ = [
    "TEACHER_NAMES",
    "AsyncAPITeacher",
    "CostLedger",
    "ResponseCache",
    "SampleResult",
    "Teacher",
    "TeacherCallError",
    "TeacherRequest",
    "TeacherResponse",
    "cache_key",
    "make_teacher",
    "teacher_options",
]
