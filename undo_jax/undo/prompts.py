"""Versioned teacher prompt templates (undo_jax/prompts/<name>_v<N>.txt) and the requests built from them.

Templates use `string.Template` placeholders ($question, ...), so braces and backslashes in math text
need no escaping. Each request carries `cache_salt = "<name>_v<N>@<sha256 prefix of the template>"`: an
edited template changes the teacher cache key even when the rendered text happens to coincide.
"""

from __future__ import annotations

import functools
import hashlib
import string
from importlib import resources
from typing import Any

from undo_jax.teachers import TeacherRequest

PROMPT_VERSIONS = {"rationale": 1, "gaps": 1, "rewrite": 1}


@functools.cache
def template(name: str) -> tuple[str, str]:
    """(text, salt) of the current version of template `name`."""
    if name not in PROMPT_VERSIONS:
        raise ValueError(f"unknown prompt template {name!r}; expected one of {', '.join(PROMPT_VERSIONS)}")
    file_name = f"{name}_v{PROMPT_VERSIONS[name]}.txt"
    text = resources.files("undo_jax").joinpath("prompts", file_name).read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return text, f"{file_name[:-4]}@{digest}"


def prompts_fingerprint() -> dict[str, str]:
    """Template name -> salt, recorded in the run's metadata."""
    return {name: template(name)[1] for name in PROMPT_VERSIONS}


def render(name: str, **fields: Any) -> str:
    text, _ = template(name)
    try:
        return string.Template(text).substitute({k: str(v) for k, v in fields.items()}).strip() + "\n"
    except KeyError as e:
        raise ValueError(f"prompt template {name}: no value for placeholder {e}") from None


def _request(name: str, content: str, settings: dict[str, Any], context: dict[str, Any]) -> TeacherRequest:
    return TeacherRequest(
        messages=[{"role": "user", "content": content}],
        temperature=float(settings.get("temperature", 0.0)),
        max_output_tokens=int(settings.get("max_output_tokens", 1024)),
        cache_salt=template(name)[1],
        context=context,
    )


def rationale_request(task, record, settings: dict[str, Any]) -> TeacherRequest:
    """Iteration 1: the teacher's first worked solution of one question."""
    content = render("rationale", question=record.question, answer_convention=task.answer_convention)
    return _request("rationale", content, settings, {"kind": "rationale", "task": task.name, "record": record})


def format_failure(index: int, item: dict[str, Any], *, with_teacher: bool) -> str:
    parts = [f"### Problem {index}", item["question"].strip(), f"Correct answer: {item['answer']}"]
    if with_teacher:
        parts.append("Your worked solution:\n" + (item.get("teacher_rationale") or "(none)").strip())
    parts.append("Student's attempt:\n" + (item.get("completion") or "").strip())
    parts.append(f"Student's final answer: {item.get('prediction')}")
    return "\n".join(parts)


def format_history(history: list[dict[str, Any]]) -> str:
    if not history:
        return "(no earlier iterations)"
    lines = []
    for h in history:
        line = (f"- Iteration {h['iteration']}: validation accuracy {100 * h['val_accuracy']:.1f}%, "
                f"trained on {h.get('train_examples', '?')} rationales")
        if h.get("gaps_summary"):
            line += f"; gaps addressed: {h['gaps_summary']}"
        lines.append(line)
    return "\n".join(lines)


def gaps_request(task, failures: list[dict[str, Any]], history: list[dict[str, Any]],
                 settings: dict[str, Any]) -> TeacherRequest:
    """Gap analysis: the teacher reads validation failures (with its own solutions) and the history."""
    body = "\n\n".join(format_failure(i + 1, f, with_teacher=True) for i, f in enumerate(failures))
    content = render("gaps", task_name=task.name, history=format_history(history), n_failures=len(failures),
                     failures=body or "(no failures to show)")
    return _request("gaps", content, settings, {"kind": "gaps", "task": task.name})


def rewrite_request(task, record, previous: str | None, gaps: str, examples: list[dict[str, Any]],
                    settings: dict[str, Any]) -> TeacherRequest:
    """Regeneration: the teacher rewrites its solution of one training question for this student."""
    body = "\n\n".join(format_failure(i + 1, f, with_teacher=False) for i, f in enumerate(examples))
    content = render("rewrite", gaps=gaps.strip(), examples=body or "(none)", question=record.question,
                     previous=(previous or "(none: your earlier solution had a wrong final answer)").strip(),
                     answer_convention=task.answer_convention)
    return _request("rewrite", content, settings, {"kind": "rewrite", "task": task.name, "record": record})
