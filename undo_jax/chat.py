"""The one prompt renderer: how a chat prompt (and its reply) becomes text for the student or a local teacher.

Used by the trainer (prompt + reply), the sampler and the local teacher (prompt with the generation prompt),
so what the student is trained on is exactly what it is later asked. A tokenizer with a chat template renders
through it; one without joins the message contents by newlines (and the reply ends with eos).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def as_messages(prompt) -> list[dict[str, str]]:
    """A string is one user turn; a message list is returned as a list."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def is_messages(prompt) -> bool:
    return isinstance(prompt, Sequence) and not isinstance(prompt, str) and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt
    )


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text up to where the assistant's reply starts (the template's generation prompt)."""
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def render_reply(tokenizer, messages: Sequence[Mapping[str, str]], reply: str) -> str:
    """The text that follows `render_prompt(messages)` when the assistant answers `reply`, end-of-turn included.

    Templates whose full rendering does not extend the prompt rendering (some re-render earlier turns) fall
    back to reply + eos, as does a tokenizer without a template.
    """
    if has_template(tokenizer):
        prompt_text = render_prompt(tokenizer, messages)
        full_text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}],
                                                  tokenize=False)
        if full_text.startswith(prompt_text):
            return full_text[len(prompt_text):]
    return reply + (tokenizer.eos_token or "")
