"""`--push_to_hub=REPO`: upload a run's final/ student (and its report) to a Hugging Face hub model repo."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class HubError(RuntimeError):
    """An upload that failed (message: one line naming the repo)."""


def push_folder(folder: str | os.PathLike, repo_id: str, *, extra: Iterable[str | os.PathLike] = (),
                endpoint: str | None = None) -> str:
    """Create `repo_id` (private) if needed and commit `folder`'s files plus `extra` files in one commit; the
    commit URL. The endpoint is HF_ENDPOINT's (the public hub by default), the token HF_TOKEN's or the login's."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    operations = [CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p)) for p in files]
    operations += [CommitOperationAdd(path_in_repo=Path(p).name, path_or_fileobj=str(p)) for p in extra
                   if Path(p).is_file()]
    api = HfApi(endpoint=endpoint)
    try:
        api.create_repo(repo_id, private=True, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=f"undo_jax: {folder.parent.name}/final")
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all end the push the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"--push_to_hub={repo_id}: upload failed ({first})") from None
    return str(getattr(info, "commit_url", "") or f"{api.endpoint}/{repo_id}")
