"""``ldb_ds.initialize``'s arguments: checked, the config picked, the user's optimizer rebuilt per unit.

What :func:`ldb_ds.engine.initialize` does with its arguments before DeepSpeed sees them: wrong
types refused naming the argument, the one DeepSpeed config found among ``config``,
``config_params`` and ``args``, an optimizer object rebuilt over one param group per unit, and a
scheduler object that could not follow that rebuild refused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Any, Iterator

import torch
from torch import nn


def check_initialize_args(model: Any, optimizer: Any, model_parameters: Any, collate_fn: Any,
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


CONFIG_ARGS = ("deepspeed_config", "deepscale_config")  # DeepSpeed's flag and its deprecated alias


def resolve_config(args: Any, config: Any, config_params: Any) -> Any:
    """The one DeepSpeed config the caller gave: ``config``, ``config_params`` or ``args``.

    DeepSpeed asserts when given two; we say which two, and how to keep one.
    """
    if config_params is not None:
        warnings.warn("ldb_ds.initialize(config_params=...) is deprecated (as in deepspeed.initialize); "
                      "pass config=...", FutureWarning, stacklevel=3)
        if config is not None:
            raise ValueError("ldb_ds.initialize got both config= and the deprecated config_params=; pass config= only")
        config = config_params
    from_args = [(name, getattr(args, name)) for name in CONFIG_ARGS if getattr(args, name, None) is not None]
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
def without_config_args(args: Any) -> Iterator[None]:
    # DeepSpeed asserts when args.deepspeed_config and config= are both set, and we pass the
    # config as the dict we read; the attributes are hidden for the call and put back after.
    saved = {name: getattr(args, name) for name in CONFIG_ARGS if getattr(args, name, None) is not None}
    for name in saved:
        setattr(args, name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


def params_of(optimizer: Any) -> Any:
    if isinstance(optimizer, torch.optim.Optimizer):
        return [dict(g) for g in optimizer.param_groups]
    return None


def rebuild_optimizer(optimizer: Any, groups: list[dict[str, Any]]) -> Any:
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


def refuse_bound_scheduler(lr_scheduler: Any) -> None:
    """An LR scheduler object, with LDB on: refused, since it drives an optimizer the engine will not step.

    ldb_ds rebuilds an optimizer instance over one param group per unit (:func:`rebuild_optimizer`),
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


def explain_scheduler_errors(lr_scheduler: Any) -> Any:
    """A callable ``lr_scheduler``, wrapped so that its failure on the per-unit param groups says why.

    With LDB on, DeepSpeed calls it with an optimizer of one param group per (unit, given group),
    so a scheduler given one value per group (``LambdaLR`` with a list of lambdas, ``OneCycleLR``
    with a list of ``max_lr``) fails with torch's count mismatch, which does not say where the
    groups came from. Every group keeps the keys of the group it came from, so such a list can be
    built from ``optimizer.param_groups``; the message says how.
    """
    if not callable(lr_scheduler):
        return lr_scheduler

    @functools.wraps(lr_scheduler)
    def make(optimizer: Any) -> Any:
        try:
            return lr_scheduler(optimizer)
        except (ValueError, TypeError, IndexError) as err:
            raise ValueError(
                f"ldb_ds.initialize: the lr_scheduler callable failed on the engine's optimizer ({err}). With LDB "
                f"on that optimizer has {len(optimizer.param_groups)} param groups, one per (LDB unit, param group "
                "you gave), so a scheduler given one value per group of yours cannot match them. Give one value "
                "(it scales every group's own lr), or build the list from the groups, which keep your groups' keys: "
                "add e.g. 'name': 'backbone' to your groups and pass lambda opt: LambdaLR(opt, "
                "[by_name[g['name']] for g in opt.param_groups])") from err

    return make


__all__ = ["check_initialize_args", "resolve_config", "without_config_args", "CONFIG_ARGS", "params_of",
           "rebuild_optimizer", "refuse_bound_scheduler", "explain_scheduler_errors"]
