"""The LDB state in a checkpoint: one file, ``ldb_state.pt``, in the checkpoint's tag folder.

The run's LDB state (``LDBController.state_dict``: epoch, mode, mask generator state, the
epoch's mask, counters) is saved and loaded here for every entry point:
``LDBEngine.save_checkpoint``/``load_checkpoint``, an engine given LDB by ``ldb_ds.attach``
(the Hugging Face Trainer, Accelerate) and ``ldb_ds.checkpointing`` (which hashes the file with
the tag's other files and copies it into a universal conversion). It is a file of its own, not
an entry of DeepSpeed's ``client_state``, because the Hugging Face Trainer's loader discards the
client state.

* **Write:** rank 0 writes (every rank holds the same epoch, mode and counters; only rank 0's
  generator draws the masks, which are broadcast, so rank 0's state is the run's state), through
  a temporary file and a rename, so a crash mid-write never leaves a torn file.
* **Read:** rank 0 reads and broadcasts, so every rank resumes rank 0's mask stream even where
  only rank 0 sees the checkpoint folder.
* **Older checkpoints:** ``LDBEngine`` checkpoints written before this format kept the state in
  DeepSpeed's client state under :data:`CLIENT_STATE_KEY`; :func:`load_checkpoint` falls back to it.
* **Module-only loads** (``load_module_only=True``) are a warm start: the LDB state stays fresh.

This module needs torch only (the engines are passed in), so ``ldb_ds.checkpointing`` uses it too.
"""

from __future__ import annotations

import glob
import inspect
import os
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.distributed as torch_dist

STATE_FILE = "ldb_state.pt"
"""Name of the LDB state file inside a checkpoint's tag folder."""

CLIENT_STATE_KEY = "layer_drop_back"
"""Where ``LDBEngine`` checkpoints written before :data:`STATE_FILE` kept the LDB state (DeepSpeed's
client state), and where ``LDBEngine.load_checkpoint`` returns the state it restored."""


def default_tag(ds_engine: Any) -> str:
    """DeepSpeed's own tag for ``save_checkpoint(tag=None)`` (engine.py:4902 in 0.19.8)."""
    return f"global_step{ds_engine.global_steps}"


def latest_tag(directory: str, universal: bool = False) -> str | None:
    """DeepSpeed's own rule for ``load_checkpoint(tag=None)`` (engine.py:4427 in 0.19.8): the tag
    named in ``<directory>/latest`` (``latest_universal`` for an engine that loads universal
    checkpoints, ``ds_engine.load_universal_checkpoint()``); None if absent."""
    latest = os.path.join(directory, "latest_universal" if universal else "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        return f.read().strip()


def param_group_layout(section: Any) -> str:
    """The param-group layout a ``layer_drop_back`` section (a dict, or None) gives the optimizer, in words."""
    if not isinstance(section, dict) or not section.get("enabled"):
        return "LDB off (the param groups as given)"
    classes, pattern = section.get("block_classes"), section.get("block_pattern")
    source = f", block_classes {list(classes)}" if classes else f", block_pattern {pattern!r}" if pattern else ""
    return f"LDB on (one param group per unit at granularity {section.get('granularity')!r}{source})"


def refuse_other_layout(load_dir: str, tag: str | None, section: Mapping[str, Any], warm_start: str) -> None:
    """Raise ``ValueError`` if checkpoint ``tag`` holds optimizer state for other param groups than ``section`` gives.

    ``section`` is this run's ``layer_drop_back`` section (``LDBConfig.to_dict()``); a checkpoint
    saved with LDB off or another granularity has other groups, and DeepSpeed's full load would
    fail with a param-group or ZeRO-layout error that does not say why (``parameter-alignment
    layout does not match``, torch's ``different number of parameter groups``). ``warm_start``
    names the call that loads the weights only, for the message. Every rank reads the same
    files and decides alike, without a collective. A missing or unreadable checkpoint is left to
    DeepSpeed's own load to report.
    """
    if tag is None:
        return  # DeepSpeed warns and loads nothing
    files = sorted(glob.glob(os.path.join(load_dir, str(tag), "*model_states.pt")))
    if not files:
        return
    ldb = read(os.path.join(load_dir, str(tag), STATE_FILE))
    if ldb is None:  # a checkpoint from before the state file (or plain DeepSpeed): the client state
        try:  # mmap: only the small client-state entries are read, not the weights
            saved = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
        except Exception:
            return
        ldb = saved.get(CLIENT_STATE_KEY) if isinstance(saved, dict) else None
    # The saved section as a plain dict: an older checkpoint's section need not pass today's validation.
    theirs = param_group_layout(ldb.get("config") if isinstance(ldb, dict) else None)
    ours = param_group_layout(dict(section))
    if theirs != ours:
        raise ValueError(f"ldb_ds: checkpoint {os.path.join(load_dir, str(tag))} was saved with {theirs}, this run "
                         f"has {ours}: its optimizer state belongs to other param groups and cannot be loaded. "
                         f"For a warm start (the weights only; optimizer, LR scheduler and LDB state fresh) "
                         f"{warm_start}.")


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file and a rename: ``path`` is whole or absent."""
    # The ".tmp<pid>" suffix is what ldb_ds.checkpointing leaves out of a tag's manifest.
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write(controller: Any, directory: str, tag: Any, name: str = STATE_FILE) -> str:
    """Write ``controller``'s state into checkpoint ``tag`` of ``directory`` (rank 0); returns its path."""
    path = os.path.join(directory, str(tag), name)
    if _rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_torch_save(controller.state_dict(), path)
    return path


def read(path: str) -> dict[str, Any] | None:
    """The state saved at ``path``, in this process only (no collective); None if there is no file."""
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(controller: Any, path: str | None, legacy: Any = None, *, where: str = "") -> dict[str, Any] | None:
    """Load the state at ``path`` (else ``legacy``, an older checkpoint's client-state entry) into
    ``controller``; every rank calls it. Rank 0 decides and broadcasts. Returns the state, or None
    (with a warning when LDB is enabled) when the checkpoint has none."""
    state = None
    if _rank() == 0:
        state = read(path) if path is not None else None
        if state is None:
            state = legacy
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        box = [state]
        torch_dist.broadcast_object_list(box, src=0, device=torch.device(controller.device))
        state = box[0]
    if state is None:
        if controller.cfg.enabled:
            name = os.path.basename(path or STATE_FILE)
            warnings.warn(f"ldb_ds: checkpoint {where or path} has no LDB state ({name}); LDB continues from its "
                          f"current state (epoch {controller.epoch}, {controller.counters.steps} steps)",
                          RuntimeWarning, stacklevel=3)
        return None
    controller.load_state_dict(state)
    return state


# --------------------------------------------------------------------------- the engines' calls


def save_checkpoint(ds_engine: Any, controller: Any, save: Callable[..., Any], save_dir: str, tag: Any = None,
                    *args: Any, state_file: str = STATE_FILE, **kwargs: Any) -> Any:
    """DeepSpeed's ``save`` (``ds_engine.save_checkpoint``) with the LDB state file: what every entry runs.

    The tag is fixed here (DeepSpeed's default) so the file lands in DeepSpeed's tag folder. The
    file is written first, so it is on disk before DeepSpeed's ``latest`` names the tag.
    DeepSpeed saves what requires grad, so every unit is trainable for its call and the mask is
    put back after (docs/design.md, section 4).
    """
    tag = default_tag(ds_engine) if tag is None else tag
    write(controller, save_dir, tag, state_file)
    with controller.all_trainable():
        return save(save_dir, tag, *args, **kwargs)


def load_checkpoint(ds_engine: Any, controller: Any, load: Callable[..., Any], load_dir: str, tag: Any = None,
                    *args: Any, state_file: str = STATE_FILE, **kwargs: Any) -> tuple[Any, dict[str, Any] | None]:
    """DeepSpeed's ``load`` (``ds_engine.load_checkpoint``) with the LDB state restored: what every entry runs.

    Returns DeepSpeed's result and the LDB state restored (None: none restored). The state comes
    from the tag's :data:`STATE_FILE`, else from an older checkpoint's client state. A
    module-only load is a warm start: the mask stream, epoch and counters stay fresh.
    """
    # Every rank takes the same branches below: DeepSpeed's own load needs every rank to see the
    # checkpoint folder, so the tag, DeepSpeed's result and load_module_only agree on all ranks,
    # and restore()'s broadcast (rank 0's LDB state) is reached by all or none.
    tag = latest_tag(load_dir, ds_engine.load_universal_checkpoint()) if tag is None else tag
    if tag is None:  # no 'latest' file: DeepSpeed warns and returns (None, None) itself
        return load(load_dir, None, *args, **kwargs), None
    args, kwargs = _zero3_weights_load(ds_engine, load, load_dir, tag, args, kwargs)
    with controller.all_trainable():  # DeepSpeed loads what requires grad (docs/design.md, section 4)
        result = load(load_dir, tag, *args, **kwargs)
    if result[0] is None or _argument(load, "load_module_only", (load_dir, tag, *args), kwargs):
        return result, None
    client = result[1] if isinstance(result[1], dict) else {}
    where = os.path.join(load_dir, str(tag))
    return result, restore(controller, os.path.join(where, state_file), client.get(CLIENT_STATE_KEY),
                           where=where)


def _zero3_weights_load(ds_engine: Any, load: Callable[..., Any], load_dir: str, tag: Any, args: tuple,
                        kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of a ZeRO-3 load that reads the weights DeepSpeed 0.19.8 can read, or a refusal.

    At ZeRO-3 ``model_states.pt`` holds no weights (the partitions are in the optimizer files).
    DeepSpeed 0.19.8 gathers them from those files only when ``load_optimizer_states`` is False
    (``get_fp32_state_dict_from_zero_checkpoint``, ``engine.py:4613-4614``); a module-only load with
    the default ``load_optimizer_states=True`` takes ``model_states.pt``'s and loads nothing, saying
    nothing (seen: the weights stayed at their initialisation). So a module-only load (the warm start
    ldb_ds's refusals point to) is made with the optimizer and scheduler states off, which is what it
    means anyway. And that gathering call is given ``load_dir`` alone, so it reads the tag named in
    ``latest``, whatever tag was asked for: a load of another tag is refused rather than given the
    latest tag's weights with the asked tag's other states. A universal checkpoint is left alone.
    """
    if not ds_engine.zero_optimization_partition_weights() or ds_engine.load_universal_checkpoint():
        return args, kwargs
    try:
        bound = inspect.signature(load).bind(load_dir, tag, *args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs  # DeepSpeed reports its own argument errors
    bound.apply_defaults()
    if bound.arguments.get("load_module_only"):
        bound.arguments["load_optimizer_states"] = False
        bound.arguments["load_lr_scheduler_states"] = False
    latest = latest_tag(load_dir)  # not universal (returned above)
    if not bound.arguments.get("load_optimizer_states", True) and str(tag) != latest:
        raise ValueError(f"ldb_ds: at ZeRO-3, DeepSpeed (0.19.8) loads the weights of a load without "
                         f"optimizer states (a module-only load included) from the tag named in "
                         f"{os.path.join(load_dir, 'latest')} ({latest!r}), not from the "
                         f"tag asked for ({tag!r}). Load tag {latest!r}, or convert tag "
                         f"{tag!r} with DeepSpeed's zero_to_fp32.py (in {load_dir}) and load that state dict into "
                         "the model before ldb_ds.initialize")
    return bound.args[2:], bound.kwargs


def _argument(fn: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> Any:
    # DeepSpeed's load_checkpoint takes load_module_only by position too.
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return kwargs.get(name, False)
    bound.apply_defaults()
    return bound.arguments.get(name, False)


def _rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


__all__ = ["STATE_FILE", "CLIENT_STATE_KEY", "default_tag", "latest_tag", "param_group_layout", "refuse_other_layout",
           "atomic_torch_save", "write", "read", "restore", "save_checkpoint", "load_checkpoint"]
