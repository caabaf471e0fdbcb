"""Teachers: one interface over Gemini, OpenAI-compatible servers, a local JAX checkpoint and the
offline reference teacher; with a persistent response cache and a cost ledger."""

from undo_jax.teachers.base import AsyncAPITeacher, Teacher
from undo_jax.teachers.cache import ResponseCache, cache_key
from undo_jax.teachers.ledger import CostLedger
from undo_jax.teachers.types import SampleResult, TeacherCallError, TeacherRequest, TeacherResponse

TEACHER_NAMES = ("gemini", "openai", "local", "reference")


def make_teacher(name: str, *, cache_path: str | None = None, **options) -> Teacher:
    """Build a teacher by name (gemini|openai|local|reference); options go to its constructor."""
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
]
