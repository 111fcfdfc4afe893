"""Whether a checkpoint fits the run about to load it, and converting it when only the world size differs.

:func:`check_compatible` compares what a tag was written by (``manifest["run"]``, from
:func:`ldb_ds.checkpointing.describe_run`: model, world size, ZeRO stage, optimizer,
``layer_drop_back`` section) with this run; :func:`to_universal` converts a ZeRO-1/2/3
checkpoint with DeepSpeed's ``ds_to_universal`` when only the world size differs, carrying the
LDB state file along. The checkpoint store itself (save, verify, find, prune) is
:mod:`ldb_ds.checkpointing`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Mapping

from .checkpointing import (MANIFEST, UNIVERSAL_SUFFIX, CheckpointError, all_gather_objects, atomic_write_text,
                            check_tag, files_of, group_rank, hash_file, read_manifest, replace_refused, verify_local)
from .state_file import STATE_FILE

ADAM_FAMILY = ("adam",)
"""Optimizer names (lower case, substring) whose state ``ds_to_universal`` converts: it reads the
keys ``exp_avg`` and ``exp_avg_sq`` (``deepspeed/checkpoint/ds_to_universal.py``)."""

LDB_STRUCTURE_KEYS = ("enabled", "granularity", "keep_first", "keep_last")
"""``layer_drop_back`` keys that change the units, hence the optimizer's param groups."""


def check_compatible(manifest: Mapping[str, Any], current: Mapping[str, Any], *, where: str,
                     allow_ldb_change: bool = True, weights_only: bool = False) -> dict[str, Any]:
    """Compare a tag's run (``manifest["run"]``) with ``current`` (:func:`ldb_ds.checkpointing.describe_run`).

    Returns ``{"universal": bool, "notes": [...]}``: ``universal`` when the checkpoint must go
    through :func:`to_universal` (ZeRO 1-3 at another world size, Adam family). Raises
    :class:`CheckpointError` for what cannot be loaded: another model, another unit structure,
    another ZeRO stage, or another world size with partitioned non-Adam optimizer state.
    ``allow_ldb_change``: schedule keys of the ``layer_drop_back`` section may differ (noted);
    with ``False`` any difference is an error. ``weights_only`` (an evaluation): the optimizer
    state is not wanted, so at ZeRO 1-2, whose module file holds the whole model on every world
    size, another world size needs no conversion (``"weights_only"`` in the verdict: load with
    ``load_module_only=True``); ZeRO-3 keeps its weights in the partitions and still converts.
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
        elif weights_only and old_z in (1, 2):
            notes.append(f"world size {old_w} -> {new_w}: evaluating, so only the module's weights are loaded "
                         f"(a ZeRO-{old_z} checkpoint holds them whole)")
            return {"universal": False, "weights_only": True, "notes": notes}
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
    return {"universal": universal, "weights_only": False, "notes": notes}


def to_universal(save_dir: str, tag: str, *, group: Any = None, timeout_s: float | None = None) -> str:
    """Convert ``tag`` with DeepSpeed's ``ds_to_universal`` into ``<tag>_universal`` (rank 0; collective).

    The LDB state file goes along (``ds_to_universal`` copies model states only). Reuses an earlier
    conversion that verifies. Load the result with the DeepSpeed config
    ``"checkpoint": {"load_universal": true}`` and ``tag=<tag>_universal``. Returns that tag.
    """
    out_tag = check_tag(tag) + UNIVERSAL_SUFFIX
    out_dir = os.path.join(save_dir, out_tag)
    error = ""
    if group_rank(group) == 0:
        # Rank 0 alone runs this, so nothing it meets may skip the gather below, where the others
        # wait: an earlier conversion that cannot be read (CheckpointError, or an OSError reading
        # its files) is converted again, and a failed conversion is the outcome every rank raises.
        try:
            verify_local(save_dir, out_tag)
        except (CheckpointError, OSError):
            try:
                error = _convert(save_dir, tag, out_tag, timeout_s)
            except Exception as err:  # noqa: BLE001 - the other ranks wait in the gather below
                error = f"converting {tag} to a universal checkpoint failed: {type(err).__name__}: {err}"
    error = all_gather_objects(error, group)[0]  # rank 0's outcome: every rank returns or raises alike
    if error:
        raise CheckpointError(error)
    return os.path.basename(out_dir)


def _convert(save_dir: str, tag: str, out_tag: str, timeout_s: float | None) -> str:
    src, dst = os.path.join(save_dir, tag), os.path.join(save_dir, out_tag)
    tmp = dst + ".tmp"
    for path in (tmp, dst):  # an earlier conversion's remains, never a folder of anything else
        if problem := replace_refused(path):
            return problem
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
    atomic_write_text(os.path.join(save_dir, "latest_universal"), out_tag)
    source = read_manifest(save_dir, tag)
    names = files_of(dst)
    manifest = {**source, "tag": out_tag, "created": time.time(), "universal_of": tag,
                "files": {n: hash_file(os.path.join(dst, n)) for n in names}}
    atomic_write_text(os.path.join(dst, MANIFEST), json.dumps(manifest, indent=1))
    return ""


__all__ = ["ADAM_FAMILY", "LDB_STRUCTURE_KEYS", "check_compatible", "to_universal"]
