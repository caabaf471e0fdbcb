"""Teacher logits for white-box distillation: one teacher-forced pass, stored sparsely on disk, computed once.

For every training example (a `TokenizedExample`: prompt then completion ids), the teacher reads the
exact ids the student trains on, and for each completion token we keep the teacher's top-k
log-probabilities and ids for that position plus the log of the remaining mass (`distill_loss`).

On disk, under `root/<teacher and k fingerprint>/`, each computed batch is one `.npz` shard written to a
temporary name and renamed into place: a killed pass loses at most the batch in flight, and a re-run
computes only the examples no shard holds. An example is found by its id *and* a key hashing the
teacher's identity, k and its token ids, so an example whose tokens changed is recomputed rather than
served stale. Per completion token: k int32 ids + k float32 log-probs + one float32 tail = 8k + 4 bytes
(260 B at k = 32).

Multi-host: every process runs the same pass (the forward is one SPMD program over the global mesh) and gets
every row's targets; only process 0 writes shards (the run directory is shared by all hosts), and no process
reads the store before the pass has ended everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from undo_jax.train.data import SparseTargets, TokenizedExample, length_bucket
from undo_jax.train.distill_loss import sparse_top_k


class TeacherLogitsError(ValueError):
    """A teacher-logit store that cannot be used as asked (one-line message naming the folder)."""


def teacher_identity(source: str) -> str:
    """What names a teacher's weights: its resolved path with the size and mtime of every file under it (a changed
    checkpoint gets new logits), or the hub id / RUN/iter_K as given."""
    path = Path(source)
    if not path.exists():
        return source
    if (path / "checkpoint").is_dir():  # RUN/iter_K: its weights, not its evaluation files
        path = path / "checkpoint"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = ";".join(f"{f.relative_to(path) if f != path else f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                     for f in files)
    return f"{path.resolve()}|{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"


def example_key(teacher_id: str, k: int, example: TokenizedExample) -> str:
    """What must match for stored logits to be reused: teacher, k, token ids and where the completion starts."""
    h = hashlib.sha256(f"{teacher_id}\0{k}\0{example.completion_start}\0".encode())
    h.update(np.asarray(example.ids, np.int32).tobytes())
    return h.hexdigest()[:32]


class TeacherLogitStore:
    """Shards of sparse teacher targets for one (teacher, k) under `root`."""

    def __init__(self, root: str | os.PathLike, teacher_id: str, k: int):
        if k < 1:
            raise TeacherLogitsError(f"{root}: top-k must be >= 1, got {k}")
        self.teacher_id, self.k = teacher_id, int(k)
        tag = hashlib.sha256(f"{teacher_id}\0{k}".encode()).hexdigest()[:16]
        self.folder = Path(root) / f"k{k}-{tag}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, tuple[Path, int]] = {}  # example key -> (shard, index in shard)
        self._open: dict[Path, dict[str, np.ndarray]] = {}
        self._held: dict[str, SparseTargets] = {}  # computed here, written by another process
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                with np.load(shard) as z:
                    keys = [str(x) for x in z["keys"]]
            except Exception as e:  # a shard is renamed into place whole, so this is outside damage
                raise TeacherLogitsError(f"{shard}: unreadable teacher-logit shard ({type(e).__name__}); "
                                         "delete it to recompute its examples") from None
            for i, key in enumerate(keys):
                self._where[key] = (shard, i)

    def __contains__(self, key: str) -> bool:
        return key in self._where or key in self._held

    def __len__(self) -> int:
        return len(self._where.keys() | self._held.keys())

    def write(self, items: Sequence[tuple[str, SparseTargets]]) -> Path:
        """Write one shard (atomically) holding `items` [(key, targets)]; returns its path."""
        if not items:
            raise ValueError("write: no items")
        lengths = np.asarray([len(t) for _, t in items], np.int64)
        arrays = {
            "keys": np.asarray([key for key, _ in items]),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]),
            "top_logp": np.concatenate([t.top_logp for _, t in items]).astype(np.float32),
            "top_ids": np.concatenate([t.top_ids for _, t in items]).astype(np.int32),
            "log_tail": np.concatenate([t.log_tail for _, t in items]).astype(np.float32),
        }
        index = len(list(self.folder.glob("shard-*.npz")))
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-shard-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            shard = self.folder / f"shard-{index:06d}-{os.getpid()}.npz"
            os.replace(tmp, shard)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        for i, (key, _) in enumerate(items):
            self._where[key] = (shard, i)
        return shard

    def remember(self, items: Sequence[tuple[str, SparseTargets]]) -> None:
        """Hold `items` in memory without writing (a process other than the writer of a multi-host pass)."""
        for key, targets in items:
            self._held[key] = targets

    def get(self, key: str) -> SparseTargets:
        if key in self._held:
            return self._held[key]
        if key not in self._where:
            raise KeyError(f"{self.folder}: no teacher logits for example key {key}")
        shard, i = self._where[key]
        if shard not in self._open:
            with np.load(shard) as z:
                self._open[shard] = {name: z[name] for name in ("offsets", "top_logp", "top_ids", "log_tail")}
        z = self._open[shard]
        a, b = int(z["offsets"][i]), int(z["offsets"][i + 1])
        return SparseTargets(z["top_logp"][a:b], z["top_ids"][a:b], z["log_tail"][a:b])


@functools.lru_cache(maxsize=8)  # one compiled program per teacher graph and k (on-policy steps call it per step)
def _sparse_program(model_graphdef, k: int):
    from flax import nnx

    @jax.jit
    def run(params, tokens, positions, segment_ids):
        model = nnx.merge(model_graphdef, params)
        hidden = model.hidden_states(tokens, positions=positions, segment_ids=segment_ids)
        # One row's [length, vocab] logits at a time: the full [rows, length, vocab] never exists.
        return jax.lax.map(lambda h: sparse_top_k(model.logits_from_hidden(h), k), hidden)

    return run


def teacher_targets(teacher, examples: Sequence[TokenizedExample], k: int, *, batch_size: int = 8, mesh=None):
    """Yield (positions in `examples`, their `SparseTargets`) batch by batch: one teacher-forced pass.

    teacher: a `CausalLM` (sharded on `mesh` like a student, if given). `examples` is taken in the given order,
    padded to a few bucket lengths; with a mesh each batch's rows are split over the batch axes.
    """
    from flax import nnx

    from undo_jax.sharding import batch_sharding

    graphdef, params = nnx.split(teacher)
    run = _sparse_program(graphdef, k)
    rows = batch_size
    sharding = None
    if mesh is not None:
        sharding = batch_sharding(mesh)
        split = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
        rows = -(-batch_size // split) * split
    for start in range(0, len(examples), batch_size):
        group = list(range(start, min(start + batch_size, len(examples))))
        longest = max(len(examples[i]) for i in group)
        length = length_bucket(longest, 1 << 30)
        tokens = np.zeros((rows, length), np.int32)
        segment_ids = np.zeros((rows, length), np.int32)
        for r, i in enumerate(group):
            ids = np.asarray(examples[i].ids, np.int32)
            tokens[r, :len(ids)] = ids
            segment_ids[r, :len(ids)] = 1
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
        args = [jnp.asarray(a) for a in (tokens, positions, segment_ids)]
        if sharding is not None:
            args = [jax.device_put(a, sharding) for a in args]
        top_logp, top_ids, log_tail = (_host(x) for x in run(params, *args))
        targets = []
        for r, i in enumerate(group):
            ex = examples[i]
            # Position j - 1 predicts token j: the completion tokens ids[start:] are predicted at start-1 .. n-2.
            sl = slice(ex.completion_start - 1, len(ex) - 1)
            targets.append(SparseTargets(top_logp[r, sl], top_ids[r, sl], log_tail[r, sl]))
        yield group, targets


def _host(array) -> np.ndarray:
    """A whole output on the host; rows that other processes' devices hold are gathered (a collective)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def _check_same_todo(keys: Sequence[str], folder: Path) -> None:
    """Every process must compute the same examples in the same order (else the shared batches would mix rows or
    hang): a store scanned while another process was writing, or other examples, is a one-line error."""
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256("\0".join(keys).encode()).digest(), np.uint32).copy()
    gathered = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
    if not (gathered == gathered[0]).all():
        differ = [i for i in range(len(gathered)) if not (gathered[i] == gathered[0]).all()]
        raise TeacherLogitsError(f"{folder}: processes {differ} would compute other teacher-logit examples than "
                                 "process 0 (different training data or store contents per process)")


def check_has_completion(examples: Mapping[str, TokenizedExample], where) -> None:
    for eid, ex in examples.items():
        if not 1 <= ex.completion_start < len(ex):
            raise TeacherLogitsError(f"{where}: example {eid!r} has no prompt token before its completion "
                                     f"or no completion (completion_start={ex.completion_start}, length={len(ex)})")


def compute_teacher_logits(teacher, examples: Mapping[str, TokenizedExample], store: TeacherLogitStore, *,
                           batch_size: int = 8, mesh=None, progress: bool = False) -> dict[str, int]:
    """Fill `store` for every example it lacks; returns {"computed", "reused"} example counts.

    Batches are length-sorted (`teacher_targets`); each is one shard written atomically (by process 0 only when
    several processes run the pass; the others keep what they computed in memory).
    """
    check_has_completion(examples, store.folder)
    keys = {eid: example_key(store.teacher_id, store.k, ex) for eid, ex in examples.items()}
    todo = sorted((eid for eid in examples if keys[eid] not in store), key=lambda e: len(examples[e]))
    if store.k > teacher.config.vocab_size:
        raise TeacherLogitsError(f"{store.folder}: top-k {store.k} exceeds the teacher's vocabulary "
                                 f"({teacher.config.vocab_size})")
    from undo_jax import distributed

    multi = jax.process_count() > 1
    if multi:  # also a barrier: process 0 writes nothing before every process has scanned the store
        _check_same_todo([keys[e] for e in todo], store.folder)
    primary = distributed.is_primary()
    bar = None
    if progress and primary:
        from undo_jax.progress import progress_bar

        bar = progress_bar(len(todo), "teacher logits", unit="ex")
    for group, targets in teacher_targets(teacher, [examples[e] for e in todo], store.k, batch_size=batch_size,
                                          mesh=mesh):
        items = [(keys[todo[i]], t) for i, t in zip(group, targets, strict=True)]
        if primary:
            store.write(items)
        else:
            store.remember(items)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    if multi:  # nobody reads the store (a new TeacherLogitStore scans the folder) before every shard is in place
        distributed.sync(f"teacher_logits:{store.folder.name}")
    return {"computed": len(todo), "reused": len(examples) - len(todo)}


PROBE_TEXT = ("Tom has 3 apples and buys 12 more; how many now? Let's think step by step. 3 + 12 = 15.\n"
              "The answer is 15. ½ café 日本 🤖 <think> \\boxed{x^2}")


def check_same_vocabulary(teacher_name: str, teacher_config, teacher_tokenizer, student_name: str, student_config,
                          student_tokenizer, probe: str = PROBE_TEXT) -> None:
    """Logit distillation compares distributions id by id: the two models must share one vocabulary.

    Raises a one-line `TeacherLogitsError` naming both models and the first difference. Vocabulary sizes
    are compared after dropping padding rows (embedding rows past the tokenizer's length, which some
    checkpoints add for alignment); cross-tokenizer distillation is out of scope.
    """
    def size(config, tokenizer):
        return min(int(config.vocab_size), len(tokenizer))

    ts, ss = size(teacher_config, teacher_tokenizer), size(student_config, student_tokenizer)
    if ts != ss:
        raise TeacherLogitsError(f"logit distillation needs one vocabulary: teacher {teacher_name} has {ts} tokens, "
                                 f"student {student_name} has {ss}")
    a = list(teacher_tokenizer(probe, add_special_tokens=False)["input_ids"])
    b = list(student_tokenizer(probe, add_special_tokens=False)["input_ids"])
    if a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        raise TeacherLogitsError(
            f"logit distillation needs one vocabulary: teacher {teacher_name} and student {student_name} tokenize "
            f"the probe text differently from token {i} (teacher ids {a[i:i + 3]}, student ids {b[i:i + 3]})")
