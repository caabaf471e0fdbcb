"""Local teacher: a JAX checkpoint of any family `undo_jax.models` loads (HF dir, .gguf, hub id),
served by the undo_jax sampler in batches, optionally sharded on a mesh.

The model is loaded on the first call that misses the cache, so a fully cached re-run never
loads it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from undo_jax.chat import render_prompt
from undo_jax.teachers.base import Teacher
from undo_jax.teachers.types import SampleResult


class LocalTeacher(Teacher):
    backend = "local"

    def __init__(
        self,
        model_path: str,
        *,
        model_name: str | None = None,
        dtype: str = "float32",
        mesh=None,
        batch_size: int | None = None,
        seed: int = 0,
        top_k: int = 0,
        top_p: float = 1.0,
        **kwargs,
    ):
        if not model_path:
            raise ValueError("local teacher: model_path is required (HF dir, .gguf file or hub id)")
        self.model_path = os.fspath(model_path)
        # The cache key names the checkpoint by its file/dir name (a move does not invalidate it).
        self.model = model_name or os.path.basename(self.model_path.rstrip("/")) or self.model_path
        self.dtype, self.mesh, self.batch_size = dtype, mesh, batch_size
        self.seed, self.top_k, self.top_p = int(seed), int(top_k), float(top_p)
        super().__init__(**kwargs)
        self._lm = None
        self._tokenizer = None

    def cache_params(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "seed": self.seed, "top_k": self.top_k, "top_p": self.top_p}

    def _load(self) -> None:
        if self._lm is None:
            from undo_jax.models import load_pretrained, load_tokenizer

            self._lm = load_pretrained(self.model_path, dtype=self.dtype, mesh=self.mesh)
            self._tokenizer = load_tokenizer(self.model_path)

    def _prompt_text(self, messages: list[dict[str, str]]) -> str:
        return render_prompt(self._tokenizer, messages)

    def _count(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _dispatch(self, requests, keys, units, on_result, progress) -> None:
        self._load()
        from undo_jax.sampling import generate

        # One sampler call per (temperature, max tokens, samples) group; units keep their own index.
        groups: dict[tuple, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, s in units:
            r = requests[i]
            groups[(float(r.temperature), int(r.max_output_tokens), int(r.num_samples))][i].append(s)
        for (temperature, max_new, n), by_request in groups.items():
            idx = sorted(by_request)
            # The sampler renders chat messages with the tokenizer's template itself.
            chats = [requests[i].messages for i in idx]
            prompts = [self._prompt_text(m) for m in chats]
            try:
                outs = generate(
                    self._lm,
                    self._tokenizer,
                    chats,
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    num_samples=n,
                    seed=self.seed,
                    batch_size=self.batch_size,
                    mesh=self.mesh,
                    progress=progress,
                )
            except (ValueError, RuntimeError) as e:
                for i in idx:
                    for s in by_request[i]:
                        on_result((i, s), f"local sampler failed: {type(e).__name__}: {e}")
                continue
            for i, prompt, completions in zip(idx, prompts, outs, strict=True):
                n_in = self._count(prompt)
                for s in by_request[i]:
                    c = completions[s]
                    on_result((i, s), SampleResult(c.text, c.finish_reason, n_in, len(c.token_ids)))
