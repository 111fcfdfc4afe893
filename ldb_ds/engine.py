"""``ldb_ds.initialize`` and the LDB engine wrapper around a DeepSpeed engine.

The wrapper changes only *which units train in a step*; DeepSpeed still does
all the work. Per optimizer step (= one gradient-accumulation window):

1. At the first training forward of the window, rank 0 draws the mask from its
   seeded generator and broadcasts it (DROP mode only); every rank sets
   ``requires_grad=False`` on the dropped units' parameters. Autograd then
   computes no weight gradient for them, their DeepSpeed gradient hooks never
   fire, so they are never reduced (no bytes on the wire).
2. ``step()``: the basic optimizer's step hides the dropped groups
   (:mod:`ldb_ds.zero_hooks`), so parameters and optimizer state of dropped
   units stay bitwise unchanged, at every ZeRO stage.
3. After the step the mask stays in place until the next window opens, so
   everything between two steps (logging, checkpoints) sees a stable state.
   ``engine.eval()``, ``engine.finish()`` and ``engine.destroy()`` make every
   unit trainable again (the end of training); the next training window
   applies a mask again.

The state and its rules live in :class:`ldb_ds.controller.LDBController`, the step protocol and
every patch on DeepSpeed in :class:`ldb_ds.installation.Installation` (shared with engines driven
by other loops); this
module connects it to a DeepSpeed engine. docs/design.md, section 3,
follows one mask from the config to the optimizer step.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import os
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import deepspeed
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

from . import refusals, state_file, zero_hooks
from .installation import install
from .config import LDBConfig, load_ds_config
from .controller import LDBState
from .refusals import LDBUnsupportedError
from .sampler import ScalableBatchSampler, build_dataloader
from .schedule import Mode, check_epoch
from .setup import check_engine, prepare
from .state_file import CLIENT_STATE_KEY  # re-exported: ldb_ds.engine.CLIENT_STATE_KEY is public
from .units import Unit


class LDBEngine:
    """A DeepSpeed engine with LayerDropBack.

    Behaves as the wrapped ``deepspeed.DeepSpeedEngine`` (attribute access is
    passed through), with ``set_epoch``, ``ldb``, ``micro_batch_size`` and
    ``finish`` added and ``forward``/``step``/``train``/``eval``/``destroy``/
    ``save_checkpoint``/``load_checkpoint`` extended.
    The wrapped engine is ``engine.ds_engine``; the LDB state is ``engine.controller``.
    """

    def __init__(self, ds_engine: Any, cfg: LDBConfig, units: Sequence[Unit], unit_of_group: Sequence[int],
                 dataloader: DataLoader | None):
        self.ds_engine = ds_engine
        self.training_dataloader = dataloader
        self.installation = install(ds_engine, cfg, units, unit_of_group)
        self.controller = self.installation.controller
        self.patches = self.installation.patches  # every change to DeepSpeed's objects (describe(), remove())
        self.ldb: LDBState = self.controller.state
        self._base_train_batch = ds_engine.train_batch_size()
        self._batch_checked = True   # set False by set_epoch in DROP epochs with micro_batch scaling
        self._batch_warned = False
        self._backward_since_step = False  # step() without backward() fails deep inside DeepSpeed

    # -- pass-through ---------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: everything DeepSpeed has is reachable.
        if name in ("ds_engine", "controller"):
            raise AttributeError(name)
        return getattr(self.ds_engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LDBEngine({self.ldb!r}, zero_stage={zero_hooks.zero_stage(self.ds_engine)})"

    # -- training loop ------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.controller.window_open and self.ds_engine.module.training and torch.is_grad_enabled():
            self.controller.open_window()
            if not self._batch_checked:
                self._check_micro_batch(args, kwargs)
        return self.ds_engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> Any:
        result = self.ds_engine.backward(loss, **kwargs)
        self._backward_since_step = True
        return result

    def step(self, **kwargs: Any) -> Any:
        """DeepSpeed's ``step()`` with LDB's step protocol; needs an ``engine.backward(loss)`` since the last one.

        Without it DeepSpeed fails inside its optimizer wrappers (an ``IndexError`` at ZeRO-0, a
        ``KeyError`` at ZeRO 1-3, LDB on or off), so it is refused here with what to do.
        """
        if not self._backward_since_step:
            raise RuntimeError("ldb_ds: engine.step() was called with no engine.backward(loss) since the last "
                               "step(); call engine.backward(loss) first (each micro step: loss = "
                               "criterion(engine(x), y); engine.backward(loss); engine.step()).")
        result = self.installation.run_step(self.ds_engine.step, **kwargs)
        self._backward_since_step = False
        return result

    def train(self, mode: bool = True) -> "LDBEngine":
        """DeepSpeed's ``train(mode)``; ``train(False)`` is :meth:`eval`."""
        self.ds_engine.train(mode)
        if not mode:
            self._release_between_windows()
        return self

    def eval(self) -> "LDBEngine":
        """DeepSpeed's ``eval()``, with every unit made trainable again.

        Evaluation (or fine-tuning code that collects ``requires_grad`` parameters)
        sees the whole model; the next training window applies a mask again.
        """
        return self.train(False)

    def finish(self) -> None:
        """End of training: every unit ``requires_grad=True`` again, as before ``initialize``.

        Call after the last ``step()``; ``eval()`` and ``destroy()`` do the same. The
        weights, the optimizer and checkpoints are not touched. Raises in the middle of
        an accumulation window (forward/backward since the last ``step()``).
        """
        if self.controller.cfg.enabled:  # disabled: plain DeepSpeed, the flags are the user's
            self.controller.release_mask()

    def destroy(self) -> Any:
        """DeepSpeed's ``destroy()``, after making every unit trainable (abandoning an open window)
        and taking every ldb_ds patch off DeepSpeed's objects (``installation.remove()``)."""
        self.installation.remove()
        return self.ds_engine.destroy()

    def compile(self, *args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's ``compile()``: refused with LDB on (it compiles the whole model; see refusals)."""
        if self.controller.cfg.enabled:
            refusals.refuse_engine_compile()
        return self.ds_engine.compile(*args, **kwargs)

    def _release_between_windows(self) -> None:
        # In the middle of a window the mask must stay (a unit dropped for part of a window would
        # get a partial or stale gradient); the window's own step() ends it.
        if self.controller.cfg.enabled and not self.controller.window_open:
            self.controller.release_mask()

    @property
    def micro_batch_size(self) -> int:
        """Per-rank batch size of one micro step in the current mode."""
        base = self.ds_engine.train_micro_batch_size_per_gpu()
        if self.controller.cfg.batch_scaling == "micro_batch":
            return base * self.controller.batch_factor
        return base

    def set_epoch(self, epoch: int) -> Mode:
        """Enter the mode of ``epoch`` (FULL/DROP), scale batch size, re-seed the sampler.

        Call at an accumulation boundary (between epochs). The learning-rate
        factor is applied inside each optimizer step, so LR schedulers keep
        their own values. Returns the mode.
        """
        c = self.controller
        mode = c.set_epoch(check_epoch(epoch, "engine.set_epoch(epoch)"))
        factor = c.batch_factor
        if c.cfg.enabled and c.cfg.batch_scaling == "accumulation":
            self.ds_engine.set_train_batch_size(self._base_train_batch * factor)
        loader = self.training_dataloader
        if loader is not None and isinstance(loader.batch_sampler, ScalableBatchSampler):
            loader.batch_sampler.factor = factor if c.cfg.batch_scaling == "micro_batch" else 1
            loader.batch_sampler.sampler.set_epoch(c.epoch)
        # A loader of the user's own cannot follow the DROP batch: check the first batch.
        self._batch_checked = not (c.cfg.enabled and mode is Mode.DROP and c.cfg.batch_scaling == "micro_batch"
                                   and factor != 1)
        return mode

    def _check_micro_batch(self, args: tuple, kwargs: dict) -> None:
        """Warn once if a DROP epoch's first micro batch is not ``micro_batch_size``.

        Only the first window of each DROP epoch is checked: a smaller last batch
        (``drop_last=False``) is normal and must not warn.
        """
        self._batch_checked = True
        observed = _leading_batch_size(args, kwargs)
        expected = self.micro_batch_size
        if observed is None or observed == expected or self._batch_warned:
            return
        self._batch_warned = True
        base = self.ds_engine.train_micro_batch_size_per_gpu()
        warnings.warn(
            f"ldb_ds: DROP epoch {self.controller.epoch} with batch_scaling 'micro_batch' expects micro batches of "
            f"engine.micro_batch_size = {expected} per rank (batch_kappa {self.controller.batch_factor} x "
            f"{base}), but the engine got a batch of {observed}. The DROP epoch then trains at another batch size "
            f"than LayerDropBack's schedule with the DROP learning rate. Fixes: use the dataloader ldb_ds.initialize "
            f"returns (training_data=...), whose batch follows the mode; or size your loader's batches from "
            f"engine.micro_batch_size after each engine.set_epoch(); or set layer_drop_back.batch_scaling = "
            f"'accumulation' (DROP batches grow through gradient accumulation; your loader stays as it is).",
            UserWarning, stacklevel=3)


    # -- checkpoints ----------------------------------------------------------

    def ldb_state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_ldb_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict | None = None,
                        save_latest: bool = True, **kwargs: Any) -> Any:
        """DeepSpeed's save_checkpoint with the LDB state in the tag folder's ``ldb_state.pt``.

        The same save as an attached engine's (:func:`ldb_ds.state_file.save_checkpoint`): every unit
        trainable for DeepSpeed's call (it saves what requires grad), the mask put back after.
        """
        return state_file.save_checkpoint(self.ds_engine, self.controller, self.ds_engine.save_checkpoint, save_dir,
                                          tag, client_state=client_state or {}, save_latest=save_latest, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> tuple[Any, dict | None]:
        """DeepSpeed's load_checkpoint; restores the LDB state saved with the checkpoint.

        The state comes from ``ldb_state.pt`` (or the client state of a checkpoint written before
        it) and is also returned in the client state, under ``CLIENT_STATE_KEY``.
        Warm start from a checkpoint with another param-group layout (plain DeepSpeed, LDB off,
        or another granularity): ``load_checkpoint(dir, load_module_only=True)`` loads the module
        weights only; optimizer, scheduler and LDB state stay fresh. A full load of such a
        checkpoint is refused before anything is loaded, naming that call (DeepSpeed would fail
        with a param-group or ZeRO-layout error that does not say why).
        """
        module_only = bool(kwargs.get("load_module_only", False))
        if not module_only and kwargs.get("load_optimizer_states", True) \
                and not self.ds_engine.load_universal_checkpoint():  # universal: remapped per parameter
            self._refuse_other_layout(load_dir, tag)
        (path, client_state), restored = state_file.load_checkpoint(
            self.ds_engine, self.controller, self.ds_engine.load_checkpoint, load_dir, tag, **kwargs)
        if restored is not None:  # callers that read it from the client state (ldb-train's resume) keep working
            client_state = {**(client_state or {}), CLIENT_STATE_KEY: restored}
        return path, client_state

    def _refuse_other_layout(self, load_dir: str, tag: Any) -> None:
        """Raise if checkpoint ``tag`` holds optimizer state for other param groups than this engine's.

        Every rank reads the same saved section from the same file and decides alike, without a
        collective: DeepSpeed's load needs every rank to see the checkpoint anyway.
        """
        tag = state_file.latest_tag(self.ds_engine, load_dir) if tag is None else tag
        if tag is None:
            return  # DeepSpeed warns and loads nothing
        files = sorted(glob.glob(os.path.join(load_dir, str(tag), "*model_states.pt")))
        if not files:
            return  # DeepSpeed reports a missing checkpoint itself
        ldb = state_file.read(os.path.join(load_dir, str(tag), state_file.STATE_FILE))
        if ldb is None:  # a checkpoint from before the state file: the section is in the client state
            try:  # mmap: only the small client-state entries are read, not the weights
                saved = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
            except Exception:
                return  # unreadable: DeepSpeed's own load reports it
            ldb = saved.get(CLIENT_STATE_KEY) if isinstance(saved, dict) else None
        # The saved section as a plain dict: an older checkpoint's section need not pass today's validation.
        theirs = _layout(ldb.get("config") if isinstance(ldb, dict) else None)
        ours = _layout(self.controller.cfg.to_dict())
        if theirs != ours:
            raise ValueError(
                f"ldb_ds: checkpoint {os.path.join(load_dir, str(tag))} was saved with {theirs}, this engine has "
                f"{ours}: its optimizer state belongs to other param groups and cannot be loaded. For a warm start "
                f"(module weights only; optimizer, LR scheduler and LDB state fresh) call "
                f"engine.load_checkpoint({load_dir!r}, tag={tag!r}, load_module_only=True).")


# --------------------------------------------------------------------------- initialize


def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Dataset | None = None, lr_scheduler: Any = None,
               config: Any = None, collate_fn: Any = None, num_workers: int = 0,
               persistent_workers: bool = False, multiprocessing_context: Any = None, **ds_kwargs: Any
               ) -> tuple[LDBEngine, Any, DataLoader | None, Any]:
    """Like ``deepspeed.initialize``; returns ``(engine, optimizer, dataloader, lr_scheduler)``.

    The LDB settings are read from the ``layer_drop_back`` section of the same
    DeepSpeed config, given exactly one way: ``config`` (a path or a dict),
    ``args.deepspeed_config`` (DeepSpeed's ``--deepspeed_config``, with
    ``args`` from a parser that ``deepspeed.add_config_arguments`` extended),
    or the deprecated ``config_params``. Two of them at once is an error (as in
    DeepSpeed). Setups ldb_ds cannot keep exact are refused with
    :class:`ldb_ds.refusals.LDBUnsupportedError` (pipeline/tensor/sequence
    parallelism, MoE, compiled modules spanning units, ...), before
    ``deepspeed.initialize`` and again on the engine it built (:mod:`ldb_ds.setup`, as at
    every entry point). With LDB enabled, the trainable parameters are cut into units and given one param group per
    (unit, user param group); every unit is trainable at initialize, because
    DeepSpeed fixes the set of optimized parameters there.

    ``optimizer`` may be None (config ``optimizer`` section), a callable
    ``params -> Optimizer`` or a torch optimizer instance; an instance is rebuilt
    over the per-unit groups with its class and settings, which
    must be done before it has state. ``lr_scheduler``, with LDB on, is a callable
    ``optimizer -> scheduler`` (DeepSpeed calls it with the optimizer it steps) or None: a
    scheduler object made beforehand is bound to another optimizer and is refused. The returned dataloader (when
    ``training_data`` is given) is a ``DistributedSampler`` loader whose batch
    size follows the LDB mode; ``num_workers``, ``persistent_workers`` and
    ``multiprocessing_context`` are passed to its ``DataLoader``. Without a context its workers
    start with torch's default (fork on Linux before Python 3.14); a process with communication
    threads running may prefer ``"forkserver"``, as ldb-train does (``--worker-start-method``;
    the dataset must then pickle, and persistent workers pickle it once per run, not per epoch).
    """
    _check_initialize_args(model, optimizer, model_parameters, collate_fn, num_workers, persistent_workers)
    ds_config = load_ds_config(_resolve_config(args, config, ds_kwargs.pop("config_params", None)))

    if model_parameters is not None and not isinstance(model_parameters, (list, tuple)):
        # model.parameters() is a generator: read it once, hand the same list to DeepSpeed.
        model_parameters = list(model_parameters)
    # The refusals visible before DeepSpeed runs, the units and one param group per (unit, user group).
    setup = prepare(model, ds_config, model_parameters if model_parameters is not None else _params_of(optimizer),
                    optimizer=optimizer, ds_kwargs=ds_kwargs)
    cfg = setup.cfg  # the section parsed once, by prepare
    if cfg.enabled:
        _refuse_bound_scheduler(lr_scheduler)
        optimizer = _rebuild_optimizer(optimizer, setup.groups)
        model_parameters = setup.groups
    # Disabled: DeepSpeed gets exactly what the user gave, for a like-for-like baseline.

    # DeepSpeed gets the config we validated, as a dict; args still carries local_rank & co.
    with _without_config_args(args):
        ds_engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
            lr_scheduler=lr_scheduler, config=ds_config, **ds_kwargs)
    try:  # the same refusals on what DeepSpeed resolved; its groups are ours, in our order
        check_engine(ds_engine, cfg, setup.units, setup.params_of_group)
    except Exception:
        ds_engine.destroy()
        raise
    loader = None
    if training_data is not None:
        drop_last = bool(ds_engine.dataloader_drop_last())
        loader = build_dataloader(training_data, dp_rank=dist.get_rank() % ds_engine.dp_world_size,
                                  dp_world_size=ds_engine.dp_world_size,
                                  micro_batch_size=ds_engine.train_micro_batch_size_per_gpu(), drop_last=drop_last,
                                  seed=cfg.seed, collate_fn=collate_fn, num_workers=num_workers,
                                  pin_memory=get_accelerator().device_name() != "cpu",
                                  persistent_workers=persistent_workers,
                                  multiprocessing_context=multiprocessing_context)
    engine = LDBEngine(ds_engine, cfg, setup.units, setup.unit_of_group, loader)
    return engine, ds_optimizer, loader, ds_scheduler


def _layout(section: Any) -> str:
    """The param-group layout a ``layer_drop_back`` section (a dict) gives the optimizer, in words."""
    if not isinstance(section, dict) or not section.get("enabled"):
        return "LDB off (the param groups as given)"
    classes, pattern = section.get("block_classes"), section.get("block_pattern")
    source = f", block_classes {list(classes)}" if classes else f", block_pattern {pattern!r}" if pattern else ""
    return f"LDB on (one param group per unit at granularity {section.get('granularity')!r}{source})"


def _check_initialize_args(model: Any, optimizer: Any, model_parameters: Any, collate_fn: Any,
                           num_workers: Any, persistent_workers: Any) -> None:
    """Wrong types are refused naming the argument (DeepSpeed would convert or fail deep inside)."""
    if model is None:
        raise ValueError("ldb_ds.initialize needs a model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"ldb_ds.initialize: model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and not callable(optimizer):
        raise TypeError(f"ldb_ds.initialize: optimizer must be None, a torch.optim.Optimizer or a callable "
                        f"params -> optimizer, got {type(optimizer).__name__}: {optimizer!r}")
    if model_parameters is not None and (isinstance(model_parameters, (str, bytes, torch.Tensor, dict))
                                         or not hasattr(model_parameters, "__iter__")):
        raise TypeError(f"ldb_ds.initialize: model_parameters must be an iterable of tensors or of param-group "
                        f"dicts (e.g. model.parameters()), got {type(model_parameters).__name__}")
    if collate_fn is not None and not callable(collate_fn):
        raise TypeError(f"ldb_ds.initialize: collate_fn must be callable or None, got {type(collate_fn).__name__}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        error = ValueError if isinstance(num_workers, int) and not isinstance(num_workers, bool) else TypeError
        raise error(f"ldb_ds.initialize: num_workers must be an integer >= 0, got "
                    f"{type(num_workers).__name__} {num_workers!r}")
    if not isinstance(persistent_workers, bool):
        raise TypeError(f"ldb_ds.initialize: persistent_workers must be a bool, got "
                        f"{type(persistent_workers).__name__} {persistent_workers!r}")


_CONFIG_ARGS = ("deepspeed_config", "deepscale_config")  # DeepSpeed's flag and its deprecated alias


def _resolve_config(args: Any, config: Any, config_params: Any) -> Any:
    """The one DeepSpeed config the caller gave: ``config``, ``config_params`` or ``args``.

    DeepSpeed asserts when given two; we say which two, and how to keep one.
    """
    if config_params is not None:
        warnings.warn("ldb_ds.initialize(config_params=...) is deprecated (as in deepspeed.initialize); "
                      "pass config=...", FutureWarning, stacklevel=3)
        if config is not None:
            raise ValueError("ldb_ds.initialize got both config= and the deprecated config_params=; pass config= only")
        config = config_params
    from_args = [(name, getattr(args, name)) for name in _CONFIG_ARGS if getattr(args, name, None) is not None]
    if len(from_args) > 1:
        raise ValueError("args has both deepspeed_config and the deprecated deepscale_config set; keep deepspeed_config")
    if from_args and config is not None:
        name, value = from_args[0]
        given = "a dict" if isinstance(config, dict) else repr(config)
        raise ValueError(f"ldb_ds.initialize got two DeepSpeed configs: args.{name} = {value!r} (from "
                         f"--{name} on the command line) and config = {given}. Pass one: drop config= to use "
                         f"the command line's file, or set args.{name} = None to use config=.")
    if from_args:
        config = from_args[0][1]
    if config is None:
        raise ValueError("ldb_ds.initialize needs a DeepSpeed config: config= (a JSON path or a dict), or args "
                         "whose deepspeed_config is set (--deepspeed_config ds.json with "
                         "deepspeed.add_config_arguments(parser))")
    return config


@contextlib.contextmanager
def _without_config_args(args: Any) -> Iterator[None]:
    # DeepSpeed asserts when args.deepspeed_config and config= are both set, and we pass the
    # config as the dict we read; the attributes are hidden for the call and put back after.
    saved = {name: getattr(args, name) for name in _CONFIG_ARGS if getattr(args, name, None) is not None}
    for name in saved:
        setattr(args, name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


def _leading_batch_size(args: tuple, kwargs: dict) -> int | None:
    """Length of the first dimension of the first tensor among the forward's inputs."""
    for value in list(args) + list(kwargs.values()):
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, torch.Tensor) and item.dim() > 0:
                return int(item.shape[0])
    return None


def _params_of(optimizer: Any) -> Any:
    if isinstance(optimizer, torch.optim.Optimizer):
        return [dict(g) for g in optimizer.param_groups]
    return None


def _rebuild_optimizer(optimizer: Any, groups: list[dict[str, Any]]) -> Any:
    """``optimizer``'s class and settings over ``groups`` (one per unit and user group).

    The constructor gets the defaults it takes as arguments; a default it does not take is one the
    constructor sets itself (torch's ``AdamW`` puts ``decoupled_weight_decay`` into its defaults but
    refuses it as an argument), so it goes into every group, which keeps its own values first
    (``groups`` carry the user's group hyperparameters). A constructor with ``**kwargs`` takes all.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer  # None (config section) or a callable DeepSpeed calls with our groups
    if optimizer.state:
        raise ValueError("pass ldb_ds.initialize an optimizer that has not stepped yet (it is rebuilt over "
                         "one param group per LDB unit), or a callable params -> optimizer")
    cls = type(optimizer)
    takes = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values())
    defaults = {k: v for k, v in optimizer.defaults.items() if k != "params"}
    arguments = {k: v for k, v in defaults.items() if takes_any or k in takes}
    set_by_constructor = {k: v for k, v in defaults.items() if k not in arguments}
    return cls([{**set_by_constructor, **g} for g in groups], **arguments)


def _refuse_bound_scheduler(lr_scheduler: Any) -> None:
    """An LR scheduler object, with LDB on: refused, since it drives an optimizer the engine will not step.

    ldb_ds rebuilds an optimizer instance over one param group per unit (:func:`_rebuild_optimizer`),
    and with a config section or a callable DeepSpeed builds the optimizer itself; a scheduler
    made before ``initialize`` is bound to another optimizer object, so DeepSpeed would step it
    and its learning rates would never reach the training (it is not an error there). A callable
    ``optimizer -> scheduler``, which DeepSpeed calls with the optimizer it steps, or the config's
    ``scheduler`` section work.
    """
    if lr_scheduler is None or callable(lr_scheduler):
        return
    bound = getattr(lr_scheduler, "optimizer", None)
    raise ValueError(
        f"ldb_ds.initialize: lr_scheduler is a {type(lr_scheduler).__name__} object"
        + (f" bound to the {type(bound).__name__} you made" if bound is not None else "")
        + ", but with LDB on the engine steps another optimizer (rebuilt over one param group per LDB unit), so "
        "its learning rates would never be applied. Pass a callable that DeepSpeed calls with the engine's "
        "optimizer, e.g. lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=30), or use "
        "the config's 'scheduler' section")


__all__ = ["initialize", "LDBEngine", "LDBState", "LDBUnsupportedError", "CLIENT_STATE_KEY"]
