"""Atomic, verified checkpoints on top of DeepSpeed's (docs/design.md, section 8).

DeepSpeed 0.19.8 writes the ``latest`` file on rank 0 *before* its final barrier, so a crash
while another rank is still writing leaves ``latest`` pointing at a half-written tag, and a
truncated file is only noticed by ``torch.load`` on whichever rank reads it. :func:`save`
therefore:

1. removes an old tag of the same name (a resumed run saving again must not leave a stale
   manifest over new files);
2. calls ``engine.save_checkpoint(..., save_latest=False)`` (which ends with a barrier; an LDB
   engine's, attached or not, also writes the tag's LDB state file, ``ldb_ds.state_file``);
3. writes each rank's own small file (``ldb_rank<r>.pt``), for what DeepSpeed keeps on data
   parallel rank 0 only (its ``client_state``) but differs per rank;
4. hashes every file of the tag, split over the ranks, and fsyncs them;
5. rank 0 writes ``ldb_manifest.json`` (sizes, SHA-256, what the run was) and then DeepSpeed's
   ``latest``, each through a temporary file and a rename, then every rank waits at a barrier.

A tag is complete exactly when its manifest exists: a crash at any earlier point leaves the
previous tag as the newest complete one. :func:`verify` checks a tag against its manifest
before any rank loads it (split over the ranks, the verdict gathered, so every rank raises the
same one-line :class:`CheckpointError` naming the file). :func:`find_resumable` walks back from
``latest`` to the newest tag that verifies. :func:`check_compatible` compares what a tag was
written by (model, world size, ZeRO stage, optimizer, ``layer_drop_back`` section) with the
run about to load it, and :func:`to_universal` converts a ZeRO-1/2/3 checkpoint with DeepSpeed's
``ds_to_universal`` when only the world size differs.

Every function that takes ``group`` is a collective over it (default: the default group).
Checkpoints are assumed to be on a file system all ranks see (as DeepSpeed's own resume at a new
world size assumes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as torch_dist

from .state_file import STATE_FILE, atomic_torch_save

MANIFEST = "ldb_manifest.json"
LATEST = "latest"
FORMAT = 1
UNIVERSAL_SUFFIX = "_universal"
_CHUNK = 8 << 20
_TMP = re.compile(r"\.tmp\d*$")  # our temporary files (a writer's, or one a crash left behind)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or does not fit this run.

    The message is one line and names the file (or the setting) that is wrong.
    """


def rank_state_file(rank: int) -> str:
    """Name of rank ``rank``'s own file inside a tag."""
    return f"ldb_rank{rank:05d}.pt"


# --------------------------------------------------------------------------- what a run is


def describe_model(model: torch.nn.Module) -> list[list[Any]]:
    """``[[name, shape], ...]`` of the parameters (full shapes also under ZeRO-3)."""
    return [[name, [int(d) for d in getattr(p, "ds_shape", p.shape)]] for name, p in model.named_parameters()]


def describe_run(model: torch.nn.Module, *, world_size: int, zero_stage: int, optimizer: str | None,
                 ldb: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint must agree with to be loaded as it is (stored in every manifest).

    ``optimizer`` is the optimizer's class or config type name (``SGD``, ``AdamW``, ``FusedAdam``);
    ``ldb`` the ``layer_drop_back`` section as a dict (``LDBConfig.to_dict()``).
    """
    return {"world_size": int(world_size), "zero_stage": int(zero_stage), "optimizer": optimizer,
            "parameters": describe_model(model), "ldb": dict(ldb) if ldb is not None else None}


def controller_of(engine: Any) -> Any:
    """The LDB controller of an LDBEngine, or of an engine given LDB by ``ldb_ds.attach``; else ``None``."""
    attachment = getattr(getattr(engine, "ds_engine", engine), "_ldb_attachment", None)
    return getattr(engine, "controller", None) or getattr(attachment, "controller", None)


def describe_engine(engine: Any) -> dict[str, Any]:
    """:func:`describe_run` of a live (LDB or DeepSpeed) engine."""
    ds = getattr(engine, "ds_engine", engine)
    opt = getattr(ds, "basic_optimizer", None)
    controller = controller_of(engine)
    return describe_run(ds.module, world_size=_world(None), zero_stage=int(ds.zero_optimization_stage()),
                        optimizer=type(opt).__name__ if opt is not None else None,
                        ldb=controller.cfg.to_dict() if controller is not None else None)


# --------------------------------------------------------------------------- save


def save(engine: Any, save_dir: str, tag: str, *, client_state: dict | None = None, rank_state: Any = None,
         meta: Mapping[str, Any] | None = None, group: Any = None) -> dict[str, Any]:
    """Save ``tag`` atomically (see the module docstring); every rank calls it. Returns the manifest.

    ``rank_state``: anything ``torch.save`` can write, one file per rank (read it back with
    :func:`load_rank_state`). ``meta``: JSON-serialisable facts stored in the manifest (the
    application's epoch, step, metric...).
    """
    rank, world = _rank(group), _world(group)
    tag_dir = os.path.join(save_dir, str(tag))
    t0 = time.perf_counter()
    if rank == 0:
        if os.path.isdir(tag_dir):  # the same tag saved again (a resumed run): no stale manifest
            _remove_manifest(tag_dir)
            shutil.rmtree(tag_dir)
        os.makedirs(save_dir, exist_ok=True)
    _barrier(group)
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False)
    if rank_state is not None:
        atomic_torch_save(rank_state, os.path.join(tag_dir, rank_state_file(rank)))
    _barrier(group)  # every rank's files are written
    names = _files_of(tag_dir)
    mine = {n: _hash_file(os.path.join(tag_dir, n)) for i, n in enumerate(names) if i % world == rank}
    files: dict[str, Any] = {}
    for part in _all_gather(mine, group):
        files.update(part)
    manifest = {"format": FORMAT, "tag": str(tag), "created": time.time(), "files": files,
                "run": describe_engine(engine), "meta": dict(meta or {}),
                "global_steps": int(getattr(getattr(engine, "ds_engine", engine), "global_steps", 0)),
                "save_s": None}
    if rank == 0:
        manifest["save_s"] = round(time.perf_counter() - t0, 3)
        _atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1))
        _atomic_write_text(os.path.join(save_dir, LATEST), str(tag))
    _barrier(group)
    return manifest


def load_rank_state(save_dir: str, tag: str, rank: int) -> Any:
    """This rank's own file of ``tag`` (``None`` if the tag has none for ``rank``)."""
    path = os.path.join(save_dir, tag, rank_state_file(rank))
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- verify and find


def read_latest(save_dir: str) -> str | None:
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def read_manifest(save_dir: str, tag: str) -> dict[str, Any]:
    """The manifest of ``tag``; :class:`CheckpointError` if it is missing or unreadable."""
    tag_dir = os.path.join(save_dir, tag)
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"checkpoint {tag_dir} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: it has no {MANIFEST} (the save did not "
                              "finish, or it was not written by ldb_ds.checkpointing.save)")
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint manifest {path} is unreadable: {err}") from None
    return manifest


def check_files(save_dir: str, tag: str, manifest: Mapping[str, Any], rank: int = 0, world: int = 1
                ) -> list[str]:
    """Problems with this rank's share (every ``world``-th file) of ``tag``'s files, one line each."""
    tag_dir = os.path.join(save_dir, tag)
    problems = []
    for i, (name, want) in enumerate(sorted(manifest["files"].items())):
        if i % world != rank:
            continue
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
            continue
        size = os.path.getsize(path)
        if size != want["size"]:
            problems.append(f"{path} is {'truncated' if size < want['size'] else 'larger than written'}: "
                            f"{size} bytes, the manifest says {want['size']}")
            continue
        if _hash_file(path, sync=False)["sha256"] != want["sha256"]:
            problems.append(f"{path} is corrupted: its SHA-256 differs from the manifest's")
    return problems


def verify(save_dir: str, tag: str, *, group: Any = None) -> dict[str, Any]:
    """Check ``tag`` against its manifest before anything loads it; every rank calls it.

    The files are checked split over the ranks and the problems gathered, so every rank
    returns the manifest or raises the same :class:`CheckpointError` (naming the first bad file).
    """
    try:
        manifest = read_manifest(save_dir, tag)
        mine = check_files(save_dir, tag, manifest, _rank(group), _world(group))
    except CheckpointError as err:
        mine = [str(err)]
        manifest = None
    problems = sorted({p for part in _all_gather(mine, group) for p in part})  # a missing manifest: once
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    assert manifest is not None
    return manifest


def list_tags(save_dir: str) -> list[str]:
    """Tags that have a manifest, ``latest``'s first, then newest first; not universal conversions
    (``<tag>_universal`` carries its source's old world size and is pruned with its source)."""
    if not os.path.isdir(save_dir):
        return []
    created = {}
    for name in os.listdir(save_dir):
        try:  # no links, and only the tag its manifest names: what save() wrote (all that prune deletes)
            manifest = {} if os.path.islink(os.path.join(save_dir, name)) else read_manifest(save_dir, name)
        except CheckpointError:
            continue
        if "universal_of" not in manifest and manifest.get("tag") == name:
            created[name] = manifest["created"]
    order = sorted(created, key=lambda t: created[t], reverse=True)
    latest = read_latest(save_dir)
    if latest in created:
        order.remove(latest)
        order.insert(0, latest)
    return order


def find_resumable(save_dir: str, *, group: Any = None, warn: Callable[[str], None] | None = None
                   ) -> tuple[str, dict[str, Any]] | None:
    """The newest tag of ``save_dir`` that verifies, ``None`` if there is no checkpoint at all.

    A tag that fails is reported through ``warn`` (naming the bad file) and the previous one is
    tried. Raises :class:`CheckpointError` when checkpoints exist but none verifies (restarting
    from scratch would silently throw their work away). Every rank calls it.
    """
    bad: list[str] = []
    latest = read_latest(save_dir)
    # verify is a collective: every rank tries rank 0's listing (another node's cache may lag).
    tags = _all_gather(list_tags(save_dir), group)[0]
    if latest is not None and latest not in tags:
        bad.append(f"'latest' names {latest}, which is not a complete checkpoint")
        if warn:
            warn(f"{bad[-1]}; looking for an older one")
    for tag in tags:
        try:
            return tag, verify(save_dir, tag, group=group)
        except CheckpointError as err:
            bad.append(str(err))
            if warn:
                warn(f"skipping checkpoint {tag}: {err}")
    if bad:
        raise CheckpointError(f"no valid checkpoint in {save_dir}: " + "; ".join(bad))
    return None


def prune(save_dir: str, keep_last: int, keep: Sequence[str] = ()) -> list[str]:
    """Delete all complete tags but the newest ``keep_last``, ``keep`` and ``latest``'s (rank 0 only).

    Incomplete tags (no manifest) are left alone: they may be another writer's. Returns the
    deleted tags. ``keep_last <= 0`` keeps everything.
    """
    if keep_last <= 0:
        return []
    tags = list_tags(save_dir)
    by_age = sorted(tags, key=lambda t: read_manifest(save_dir, t)["created"], reverse=True)
    keep_set = set(by_age[:keep_last]) | set(keep) | {read_latest(save_dir)}
    gone = [t for t in by_age if t not in keep_set]
    for tag in gone:
        _remove_manifest(os.path.join(save_dir, tag))  # incomplete first, so a crash here leaves no lie
        for name in (tag, tag + UNIVERSAL_SUFFIX):  # never through a link out of save_dir (issue 18)
            if os.path.isdir(path := os.path.join(save_dir, name)) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
    return gone


# --------------------------------------------------------------------------- compatibility


ADAM_FAMILY = ("adam",)
"""Optimizer names (lower case, substring) whose state ``ds_to_universal`` converts: it reads the
keys ``exp_avg`` and ``exp_avg_sq`` (``deepspeed/checkpoint/ds_to_universal.py``)."""

LDB_STRUCTURE_KEYS = ("enabled", "granularity", "keep_first", "keep_last")
"""``layer_drop_back`` keys that change the units, hence the optimizer's param groups."""


def check_compatible(manifest: Mapping[str, Any], current: Mapping[str, Any], *, where: str,
                     allow_ldb_change: bool = True) -> dict[str, Any]:
    """Compare a tag's run (``manifest["run"]``) with ``current`` (:func:`describe_run`).

    Returns ``{"universal": bool, "notes": [...]}``: ``universal`` when the checkpoint must go
    through :func:`to_universal` (ZeRO 1-3 at another world size, Adam family). Raises
    :class:`CheckpointError` for what cannot be loaded: another model, another unit structure,
    another ZeRO stage, or another world size with partitioned non-Adam optimizer state.
    ``allow_ldb_change``: schedule keys of the ``layer_drop_back`` section may differ (noted);
    with ``False`` any difference is an error.
    """
    run = manifest.get("run") or {}
    notes: list[str] = []
    old_p, new_p = run.get("parameters") or [], current.get("parameters") or []
    if old_p != new_p:
        first = next((f"{a[0]} {tuple(a[1])} there, {b[0]} {tuple(b[1])} here" for a, b in zip(old_p, new_p)
                      if a != b), "the lists differ in length")
        raise CheckpointError(f"{where} was written for another model: {len(old_p)} parameter tensors there, "
                              f"{len(new_p)} here; first difference: {first}")
    old_l, new_l = run.get("ldb") or {}, current.get("ldb") or {}
    changed = sorted(k for k in set(old_l) | set(new_l) if old_l.get(k) != new_l.get(k))
    if changed:
        what = ", ".join(f"{k}: {old_l.get(k)!r} -> {new_l.get(k)!r}" for k in changed)
        structural = [k for k in changed if k in LDB_STRUCTURE_KEYS]
        if structural or not allow_ldb_change:
            why = "it changes the units and so the optimizer's param groups" if structural else \
                "the run is resumed in the middle of an epoch"
            raise CheckpointError(f"{where} was written with another layer_drop_back section ({what}); "
                                  f"this cannot be resumed: {why}")
        notes.append(f"layer_drop_back differs from the checkpoint's ({what}); the new values apply from now on")
    old_z, new_z = run.get("zero_stage"), current.get("zero_stage")
    if old_z != new_z:
        raise CheckpointError(f"{where} was written at ZeRO stage {old_z}, this run uses stage {new_z}; "
                              "resume with the checkpoint's stage")
    old_w, new_w = run.get("world_size"), current.get("world_size")
    universal = False
    if old_w != new_w:
        if old_z == 0:
            notes.append(f"world size {old_w} -> {new_w}: a ZeRO-0 checkpoint loads as it is")
        else:
            name = str(run.get("optimizer") or "unknown")
            if not any(a in name.lower() for a in ADAM_FAMILY):
                raise CheckpointError(
                    f"{where} was written at world size {old_w} with ZeRO stage {old_z} and optimizer {name}; "
                    f"at world size {new_w} its partitioned optimizer state must go through DeepSpeed's universal "
                    "checkpoint (ds_to_universal), which converts Adam-family states only (exp_avg, exp_avg_sq). "
                    f"Resume at world size {old_w}, or save from a ZeRO-0 run")
            universal = True
            notes.append(f"world size {old_w} -> {new_w}: converting to DeepSpeed's universal checkpoint")
    return {"universal": universal, "notes": notes}


def to_universal(save_dir: str, tag: str, *, group: Any = None, timeout_s: float | None = None) -> str:
    """Convert ``tag`` with DeepSpeed's ``ds_to_universal`` into ``<tag>_universal`` (rank 0; collective).

    The LDB state file goes along (``ds_to_universal`` copies model states only). Reuses an earlier
    conversion that verifies. Load the result with the DeepSpeed config
    ``"checkpoint": {"load_universal": true}`` and ``tag=<tag>_universal``. Returns that tag.
    """
    out_tag = tag + UNIVERSAL_SUFFIX
    out_dir = os.path.join(save_dir, out_tag)
    error = ""
    if _rank(group) == 0:
        try:
            verify_local(save_dir, out_tag)
        except CheckpointError:
            try:
                error = _convert(save_dir, tag, out_tag, timeout_s)
            except Exception as err:  # noqa: BLE001 - the other ranks wait in the gather below
                error = f"converting {tag} to a universal checkpoint failed: {type(err).__name__}: {err}"
    error = _all_gather(error, group)[0]  # rank 0's outcome: every rank returns or raises alike
    if error:
        raise CheckpointError(error)
    return os.path.basename(out_dir)


def verify_local(save_dir: str, tag: str) -> dict[str, Any]:
    """:func:`verify` in one process (no collective)."""
    manifest = read_manifest(save_dir, tag)
    problems = check_files(save_dir, tag, manifest)
    if problems:
        raise CheckpointError(problems[0])
    return manifest


def _convert(save_dir: str, tag: str, out_tag: str, timeout_s: float | None) -> str:
    src, dst = os.path.join(save_dir, tag), os.path.join(save_dir, out_tag)
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
           "--output_folder", tmp, "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"ds_to_universal on {src} took longer than {timeout_s:.0f} s"
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        why = ""
        if "KeyError: 'exp_avg" in last[0]:
            # ds_to_universal reads Adam's moments of every param group; a unit LDB dropped in
            # every step so far (a run that began in a DROP epoch) has none yet.
            why = ("; some param groups have no Adam state yet (LDB units never updated so far, or a non-Adam "
                   "optimizer): resume at the checkpoint's world size")
        return f"ds_to_universal failed on {src} (exit code {proc.returncode}): {last[0]}{why}"
    if os.path.isfile(ldb_state := os.path.join(src, STATE_FILE)):  # ds_to_universal copies model states only
        shutil.copy2(ldb_state, tmp)
    os.replace(tmp, dst)
    # ds_to_universal points latest_universal at the temporary name; the tag is passed explicitly.
    _atomic_write_text(os.path.join(save_dir, "latest_universal"), out_tag)
    source = read_manifest(save_dir, tag)
    names = _files_of(dst)
    manifest = {**source, "tag": out_tag, "created": time.time(), "universal_of": tag,
                "files": {n: _hash_file(os.path.join(dst, n)) for n in names}}
    _atomic_write_text(os.path.join(dst, MANIFEST), json.dumps(manifest, indent=1))
    return ""


# --------------------------------------------------------------------------- helpers


def _rank(group: Any) -> int:
    return torch_dist.get_rank(group) if torch_dist.is_initialized() else 0


def _world(group: Any) -> int:
    return torch_dist.get_world_size(group) if torch_dist.is_initialized() else 1


def _barrier(group: Any) -> None:
    if torch_dist.is_initialized() and _world(group) > 1:
        torch_dist.barrier(group=group)


def _all_gather(obj: Any, group: Any) -> list[Any]:
    if not torch_dist.is_initialized() or _world(group) == 1:
        return [obj]
    out: list[Any] = [None] * _world(group)
    torch_dist.all_gather_object(out, obj, group=group)
    return out


def _files_of(tag_dir: str) -> list[str]:
    names = []
    for root, _, files in os.walk(tag_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), tag_dir)
            if rel != MANIFEST and not _TMP.search(rel):
                names.append(rel)
    return sorted(names)


def _hash_file(path: str, sync: bool = True) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:  # on disk before the manifest says it is (a node crash must not leave a lie)
            os.fsync(f.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def _remove_manifest(tag_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tag_dir, MANIFEST))


__all__ = ["CheckpointError", "controller_of", "MANIFEST", "LATEST", "UNIVERSAL_SUFFIX", "ADAM_FAMILY",
           "rank_state_file", "describe_model", "describe_run", "describe_engine", "save", "load_rank_state",
           "read_latest", "read_manifest", "check_files", "verify", "verify_local", "list_tags", "find_resumable",
           "prune", "check_compatible", "to_universal"]
