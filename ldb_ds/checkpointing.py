"""Atomic, verified checkpoints on top of DeepSpeed's (docs/design.md, section 8).

DeepSpeed 0.19.8 writes the ``latest`` file on rank 0 *before* its final barrier, so a crash
while another rank is still writing leaves ``latest`` pointing at a half-written tag, and a
truncated file is only noticed by ``torch.load`` on whichever rank reads it. :func:`save`
therefore:

1. removes an old tag of the same name (a resumed run saving again must not leave a stale
   manifest over new files), but only a folder that is a checkpoint (:func:`replace_refused`),
   and only under a tag that names one folder inside ``save_dir`` (:func:`check_tag`);
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
``latest`` to the newest tag that verifies. :mod:`ldb_ds.checkpoint_fit` decides whether a tag
fits the run about to load it (from what :func:`describe_run` recorded in its manifest) and
converts it when only the world size differs.

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


# --------------------------------------------------------------------------- tags and what may be replaced


def check_tag(tag: Any) -> str:
    """``tag`` as a string if it names one folder inside a checkpoint directory, else ValueError.

    A tag is joined to the checkpoint directory, and saving a tag again replaces its folder: a
    tag that is empty, ``.``, ``..``, holds a path separator or is absolute (``os.path.join``
    then drops the directory) would name a folder outside it, or the directory itself.
    """
    name = str(tag)
    if name in ("", ".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name) \
            or "\0" in name:
        raise ValueError(f"checkpoint tag {tag!r} is not one folder name (no path separator, not empty, "
                         "'.' or '..'): a tag names a folder inside the checkpoint directory")
    return name


# What a save or a conversion writes into a tag's folder, and nothing else: DeepSpeed's files (every
# name its save_checkpoint uses ends in model_states.pt or optim_states.pt: engine.py, _get_ckpt_name
# and the like), ldb_ds's own (the manifest, the LDB state, the rank files) and the temporaries of
# both (.tmp<pid>); below zero/ and tmp/, ds_to_universal's tree (zero/<param>/<state>.pt, and its
# slices tmp/<param>/<tp>/<state>.<dp rank> when it did not finish).
_DEEPSPEED_FILE = re.compile(r"(model_states|optim_states)\.pt$")
_OWN_FILE = re.compile(r"ldb_rank\d+\.pt|" + re.escape(STATE_FILE) + "|" + re.escape(MANIFEST))  # rank_state_file
_TEMPORARY = re.compile(r"\.tmp\d*$")
_UNIVERSAL_TREE = {"zero": re.compile(r"\.pt$"), "tmp": re.compile(r"(\.pt|\.\d+)$")}


def _written_by_a_save(rel: str) -> bool:
    """Whether a file at ``rel`` (relative to a tag's folder) is one a save or a conversion writes."""
    top, _, rest = rel.partition(os.sep)
    name = os.path.basename(rel)
    if _TEMPORARY.search(name):
        return True
    if not rest:
        return bool(_DEEPSPEED_FILE.search(name) or _OWN_FILE.fullmatch(name))
    tree = _UNIVERSAL_TREE.get(top)
    return bool(tree and tree.search(name))


def replace_refused(path: str) -> str:
    """Why the folder at ``path`` may not be deleted to save a tag there again; ``""`` if it may.

    It may when it does not exist, when it is a checkpoint :func:`save` completed (its manifest
    names it), or when it holds only what a save or a conversion that did not finish leaves (no
    manifest; :func:`_written_by_a_save`). Anything else - a link, a file no checkpoint writes
    (``weights.pt``, ``notes.txt``), a folder of the user's that happens to have the tag's name -
    is refused, naming the first such entry, because deleting it could lose the user's files.
    """
    if os.path.islink(path):
        return f"{path} is a symbolic link, not a checkpoint folder: it is not replaced; choose another tag"
    if not os.path.lexists(path):
        return ""
    if not os.path.isdir(path):
        return f"{path} exists and is not a checkpoint folder: it is not replaced; choose another tag"
    try:
        if read_manifest(os.path.dirname(path), os.path.basename(path)).get("tag") == os.path.basename(path):
            return ""
    except CheckpointError:
        pass  # no (readable) manifest: an unfinished save, or not a checkpoint at all
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = os.path.join(root, name)
            foreign = os.path.islink(entry) or (
                name in files and not _written_by_a_save(os.path.relpath(entry, path)))
            if foreign:
                return (f"{path} holds {entry}, which no checkpoint writes: the folder is not replaced "
                        "(it may hold your files); choose another tag, or move it away")
    return ""


# --------------------------------------------------------------------------- save


def save(engine: Any, save_dir: str, tag: str, *, client_state: dict | None = None, rank_state: Any = None,
         meta: Mapping[str, Any] | None = None, group: Any = None) -> dict[str, Any]:
    """Save ``tag`` atomically (see the module docstring); every rank calls it. Returns the manifest.

    ``rank_state``: anything ``torch.save`` can write, one file per rank (read it back with
    :func:`load_rank_state`). ``meta``: JSON-serialisable facts stored in the manifest (the
    application's epoch, step, metric...).
    """
    rank, world = group_rank(group), _world(group)
    tag = check_tag(tag)  # the same on every rank: all raise, none waits in a collective
    tag_dir = os.path.join(save_dir, tag)
    t0 = time.perf_counter()
    problem = ""
    if rank == 0:
        try:
            problem = replace_refused(tag_dir)
            if not problem:
                if os.path.isdir(tag_dir):  # the same tag saved again (a resumed run): no stale manifest
                    _remove_manifest(tag_dir)
                    shutil.rmtree(tag_dir)
                os.makedirs(save_dir, exist_ok=True)
        except Exception as err:  # noqa: BLE001 - the other ranks wait in the gather below: they raise it too
            # Any failure, not only OSError: rank 0 alone runs this, and must reach the gather.
            problem = f"cannot prepare the checkpoint folder {tag_dir}: {err}"
    problem = all_gather_objects(problem, group)[0]  # rank 0's verdict, on every rank: also the barrier
    if problem:
        raise CheckpointError(problem)
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False)
    if rank_state is not None:
        atomic_torch_save(rank_state, os.path.join(tag_dir, rank_state_file(rank)))
    _barrier(group)  # every rank's files are written
    names = files_of(tag_dir)
    mine = {n: hash_file(os.path.join(tag_dir, n)) for i, n in enumerate(names) if i % world == rank}
    files: dict[str, Any] = {}
    for part in all_gather_objects(mine, group):
        files.update(part)
    manifest = {"format": FORMAT, "tag": str(tag), "created": time.time(), "files": files,
                "run": describe_engine(engine), "meta": dict(meta or {}),
                "global_steps": int(getattr(getattr(engine, "ds_engine", engine), "global_steps", 0)),
                "save_s": None}
    if rank == 0:
        manifest["save_s"] = round(time.perf_counter() - t0, 3)
        atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1))
        atomic_write_text(os.path.join(save_dir, LATEST), str(tag))
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
        # Parseable but malformed (JSON that is no object, an entry without size or SHA-256) is
        # refused here as unreadable: the callers catch CheckpointError, and a KeyError or
        # AttributeError would leave the one rank that reads it (rank 0 in save and to_universal,
        # one rank's share in verify) out of the gather its peers wait in.
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
        bad = [n for n, e in manifest["files"].items()
               if not (isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str))]
        if bad:
            raise ValueError(f"the entry of {bad[0]} has no integer size and SHA-256")
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
        if hash_file(path, sync=False)["sha256"] != want["sha256"]:
            problems.append(f"{path} is corrupted: its SHA-256 differs from the manifest's")
    return problems


def verify(save_dir: str, tag: str, *, group: Any = None) -> dict[str, Any]:
    """Check ``tag`` against its manifest before anything loads it; every rank calls it.

    The files are checked split over the ranks and the problems gathered, so every rank
    returns the manifest or raises the same :class:`CheckpointError` (naming the first bad file).
    """
    try:
        manifest = read_manifest(save_dir, tag)
        mine = check_files(save_dir, tag, manifest, group_rank(group), _world(group))
    except CheckpointError as err:
        mine = [str(err)]
        manifest = None
    except Exception as err:  # noqa: BLE001 - this rank's share only (an EIO, EACCES): said, gathered
        # Each rank reads its own share of the files, so what fails here fails on this rank alone;
        # leaving now would strand the others in the gather. It becomes this rank's problem line,
        # and the gathered list is the verdict every rank raises alike.
        mine = [f"checkpoint {os.path.join(save_dir, tag)} could not be checked on rank {group_rank(group)}: "
                f"{type(err).__name__}: {err}"]
        manifest = None
    problems = sorted({p for part in all_gather_objects(mine, group) for p in part})  # a missing manifest: once
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    assert manifest is not None
    return manifest


def verify_local(save_dir: str, tag: str) -> dict[str, Any]:
    """:func:`verify` in one process (no collective)."""
    manifest = read_manifest(save_dir, tag)
    problems = check_files(save_dir, tag, manifest)
    if problems:
        raise CheckpointError(problems[0])
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
    # verify is a collective and the verdict (raise, or None) must be the same everywhere: every rank
    # takes rank 0's 'latest' and listing (another node's file-system cache may lag).
    latest, tags = all_gather_objects((read_latest(save_dir), list_tags(save_dir)), group)[0]
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


# --------------------------------------------------------------------------- helpers


def group_rank(group: Any) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return torch_dist.get_rank(group) if torch_dist.is_initialized() else 0


def _world(group: Any) -> int:
    return torch_dist.get_world_size(group) if torch_dist.is_initialized() else 1


def _barrier(group: Any) -> None:
    if torch_dist.is_initialized() and _world(group) > 1:
        torch_dist.barrier(group=group)


def all_gather_objects(obj: Any, group: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` alone); a collective: every rank of ``group`` calls it."""
    if not torch_dist.is_initialized() or _world(group) == 1:
        return [obj]
    out: list[Any] = [None] * _world(group)
    torch_dist.all_gather_object(out, obj, group=group)
    return out


def files_of(tag_dir: str) -> list[str]:
    """The files under ``tag_dir``, relative and sorted, that a manifest lists (not itself, not temporaries)."""
    names = []
    for root, _, files in os.walk(tag_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), tag_dir)
            if rel != MANIFEST and not _TMP.search(rel):
                names.append(rel)
    return sorted(names)


def hash_file(path: str, sync: bool = True) -> dict[str, Any]:
    """``{"size", "sha256"}`` of ``path`` as a manifest records it; with ``sync``, fsynced first."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:  # on disk before the manifest says it is (a node crash must not leave a lie)
            os.fsync(f.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def atomic_write_text(path: str, text: str) -> None:
    """Write ``path`` whole or not at all: a temporary file, fsynced, renamed over it, the folder fsynced."""
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


__all__ = ["CheckpointError", "controller_of", "MANIFEST", "LATEST", "UNIVERSAL_SUFFIX",
           "check_tag", "replace_refused",
           "rank_state_file", "describe_model", "describe_run", "describe_engine", "save", "load_rank_state",
           "read_latest", "read_manifest", "check_files", "verify", "verify_local", "list_tags", "find_resumable",
           "prune", "group_rank", "all_gather_objects", "files_of", "hash_file", "atomic_write_text"]
