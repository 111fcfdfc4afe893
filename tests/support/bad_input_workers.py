"""Code that runs inside the ranks of the library's bad-input and warm-start tests.

Real ldb_ds engines over real DeepSpeed engines (CPU, gloo). The test process gets back plain
data: for each misuse, the exception's type and message and the warnings raised; for the warm
start, weights before and after.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from typing import Any, Callable

import torch
from torch import nn

IN_DIM, OUT_DIM, MICRO_BATCH = 4, 2, 2
ON = {"enabled": True, "keep_first": 1, "keep_last": 1, "drop_rate": 0.5, "sampling_rate": 1, "batch_kappa": 1}


def make_model() -> nn.Module:
    """Three Linear units: with keep_first = keep_last = 1 the middle one is droppable."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_DIM, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, OUT_DIM))


class TiedModel(nn.Module):
    """An embedding whose weight the head shares (GPT-2 style tying)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.mid(self.embed(x))))


def ds_config(stage: int = 0, ldb: Any = ON) -> dict[str, Any]:
    """A small SGD config; ``ldb`` is the ``layer_drop_back`` section (``"absent"``: no section)."""
    cfg = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "steps_per_print": 10_000}
    if ldb != "absent":
        cfg["layer_drop_back"] = ldb
    return cfg


def train_step(engine: Any) -> None:
    x = torch.randn(MICRO_BATCH * engine.ldb.batch_factor, IN_DIM)
    engine.backward(engine(x).pow(2).mean())
    engine.step()


def tree_hashes(root: str) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (to show nothing was changed)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# --------------------------------------------------------------------------- misuse cases


def _engine(stage: int = 0, ldb: Any = ON, model: nn.Module | None = None) -> Any:
    import ldb_ds

    engine, *_ = ldb_ds.initialize(model=model or make_model(), config=ds_config(stage, ldb))
    return engine


def _step_before_backward(stage: int, ldb: Any) -> Callable[[], Any]:
    def case() -> Any:
        engine = _engine(stage, ldb)
        engine.set_epoch(1)
        return engine.step()
    return case


def _second_step_without_backward() -> Any:
    engine = _engine()
    engine.set_epoch(0)
    train_step(engine)
    return engine.step()


def _set_epoch(value: Any) -> Callable[[], Any]:
    return lambda: _engine().set_epoch(value)


def _disabled_section_is_not_checked_against_the_model() -> Any:
    # With LDB on, each of these is refused against this model (no block source; nothing left to drop).
    engine = _engine(ldb={"enabled": False, "granularity": "block", "keep_first": 10})
    engine.set_epoch(2)
    train_step(engine)
    return engine.ldb.enabled, engine.ldb.steps


def _null_section() -> Any:
    engine = _engine(ldb=None)
    engine.set_epoch(2)
    train_step(engine)
    return engine.ldb.enabled, engine.ldb.mode.value


def _tied_weights() -> Any:
    import ldb_ds

    engine, *_ = ldb_ds.initialize(model=TiedModel(), config=ds_config(0, {**ON, "keep_first": 1}))
    return [u.name for u in engine.ldb.units]


def _full_load_of(saved_section: Any) -> Callable[[], Any]:
    """A full load, into an LDB engine at module granularity, of a checkpoint saved with ``saved_section``."""
    def case() -> Any:
        with tempfile.TemporaryDirectory(prefix="ldb_other_ckpt_") as directory:
            return _full_load_refused(directory, saved_section)
    return case


def _full_load_refused(directory: str, saved_section: Any) -> Any:
    plain = _engine(ldb=saved_section)
    plain.set_epoch(0)
    train_step(plain)
    plain.save_checkpoint(directory, tag="plain")
    before = tree_hashes(directory)
    engine = _engine()
    weights = [p.detach().clone() for p in engine.module.parameters()]
    try:
        engine.load_checkpoint(directory)
    except ValueError as err:
        unchanged = all(torch.equal(a, b) for a, b in zip(weights, engine.module.parameters()))
        raise ValueError(f"{err} [files unchanged: {tree_hashes(directory) == before}; "
                         f"weights unchanged: {unchanged}]") from None
    return "loaded"


def _adamw_object() -> Any:
    """A torch AdamW object (its constructor refuses one of its own defaults, decoupled_weight_decay)."""
    import ldb_ds

    model = make_model()
    config = ds_config(2)
    del config["optimizer"]
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05, betas=(0.8, 0.9))
    engine, *_ = ldb_ds.initialize(model=model, optimizer=opt, config=config)
    engine.set_epoch(0)
    train_step(engine)
    groups = engine.ds_engine.basic_optimizer.param_groups
    return (type(engine.ds_engine.basic_optimizer).__name__, len(groups), [g["lr"] for g in groups],
            [g["weight_decay"] for g in groups], all(g["betas"] == (0.8, 0.9) for g in groups),
            all(g["decoupled_weight_decay"] for g in groups))


def _callable_scheduler() -> Any:
    """lr_scheduler as a callable: DeepSpeed builds it on the optimizer it steps (one group per unit)."""
    import ldb_ds

    model = make_model()
    config = ds_config(0)
    del config["optimizer"]
    engine, _, _, scheduler = ldb_ds.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), config=config)
    engine.set_epoch(0)
    for _ in range(2):
        train_step(engine)
    return engine.get_lr(), scheduler.optimizer is engine.ds_engine.basic_optimizer


def _module_called_directly() -> Any:
    """A DROP step whose forward bypassed the engine (``engine.module(x)``): no mask was drawn."""
    engine = _engine(2)
    engine.set_epoch(1)
    x = torch.randn(MICRO_BATCH * engine.ldb.batch_factor, IN_DIM)
    engine.backward(engine.module(x).pow(2).mean())
    return engine.step()


def _torch_style_backward() -> Any:
    """DeepSpeed 0.19.8's ``loss.backward(); engine.step()`` at ZeRO-2, in a DROP epoch."""
    engine = _engine(2, {**ON, "drop_rate": 0.99})  # the middle unit is dropped
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.set_epoch(1)
    x = torch.randn(MICRO_BATCH * engine.ldb.batch_factor, IN_DIM)
    engine(x).pow(2).mean().backward()
    engine.step()
    dropped = {n for i in engine.ldb.dropped_units for n in engine.ldb.units[i].param_names}
    moved = {n for n, p in engine.module.named_parameters() if not torch.equal(p, before[n])}
    return engine.ds_engine.global_steps, bool(dropped), moved.isdisjoint(dropped), bool(moved)


def _user_freeze_with_ldb_off() -> Any:
    """LDB off: a layer frozen after initialize stays frozen (and unchanged) through set_epoch,
    steps and a checkpoint, as in plain DeepSpeed."""
    engine = _engine(1, {"enabled": False})
    frozen = engine.module[2]
    frozen.requires_grad_(False)
    before = frozen.weight.detach().clone()
    with tempfile.TemporaryDirectory(prefix="ldb_freeze_") as directory:
        for epoch in range(2):
            engine.set_epoch(epoch)
            train_step(engine)
            engine.save_checkpoint(directory, tag=f"e{epoch}")
    return frozen.weight.requires_grad, torch.equal(frozen.weight, before)


def _user_freeze_after_initialize(when: str) -> Callable[[], Any]:
    """LDB on: a layer frozen after initialize would train again at the next mask; refused at the
    next set_epoch (frozen after a step) or at the DROP epoch's first window (frozen after
    set_epoch), before anything is stepped with the flag undone."""
    def case() -> Any:
        engine = _engine(1)
        engine.set_epoch(0)
        train_step(engine)
        if when == "after_set_epoch":
            engine.set_epoch(1)
        engine.module[2].requires_grad_(False)
        before = engine.module[2].weight.detach().clone()
        try:
            if when == "before_set_epoch":
                engine.set_epoch(1)
            train_step(engine)
        finally:  # what the test also checks: the refusal left the frozen layer frozen and unchanged
            case.after = (engine.module[2].weight.requires_grad, torch.equal(engine.module[2].weight, before))
        return "trained on"
    return case


def _user_freeze_then(call: str) -> Callable[[], Any]:
    """LDB on, a kept layer frozen after a step, then ``call``: refused before the flags change."""
    def case() -> Any:
        engine = _engine(1, {**ON, "sampling_rate": 1})  # epochs 0, 2, ...: FULL; 1, 3, ...: DROP
        engine.set_epoch(1 if call == "drop_window" else 0)
        train_step(engine)
        frozen = engine.module[0]  # keep_first = 1: kept by every mask
        frozen.requires_grad_(False)
        before = frozen.weight.detach().clone()
        try:
            with tempfile.TemporaryDirectory(prefix="ldb_freeze_") as directory:
                if call == "drop_window":
                    train_step(engine)
                elif call == "save_checkpoint":
                    engine.save_checkpoint(directory, tag="t")
                else:
                    engine.eval()
        finally:
            case.after = (frozen.weight.requires_grad, torch.equal(frozen.weight, before))
        return "went on"
    return case


def _per_group_scheduler_list() -> Any:
    """LDB on, two param groups of the user's and a LambdaLR with one lambda each: the optimizer
    has one group per (unit, user group), so torch's count check fails; the message says why and
    how to build the list (every group keeps the user's keys, here 'name')."""
    import ldb_ds

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        named = list(model.named_parameters())
        return [{"params": [p for n, p in named if n.endswith("weight")], "name": "weights"},
                {"params": [p for n, p in named if n.endswith("bias")], "name": "biases"}]

    model = make_model()
    config = ds_config(0)
    del config["optimizer"]
    factor = {"weights": lambda s: 1.0, "biases": lambda s: 0.5}
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    first = "accepted"
    try:
        ldb_ds.initialize(model=model, model_parameters=groups(model), optimizer=sgd, config=config,
                          lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, list(factor.values())))
    except ValueError as err:
        first = f"{type(err).__name__}: {err}"
    # What the message proposes: the list built from the engine's groups, by the user's key.
    model = make_model()
    engine, _, _, scheduler = ldb_ds.initialize(
        model=model, model_parameters=groups(model), optimizer=sgd, config=config,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, [factor[g["name"]] for g in o.param_groups]))
    lrs = sorted({g["lr"] for g in engine.optimizer.param_groups})
    return f"{first} | then: {lrs}"


def _torch_schedulers_at_zero0() -> Any:
    """ZeRO-0, where the returned optimizer is the torch optimizer: a torch LR scheduler made on it
    after initialize (as with plain DeepSpeed; it wraps optimizer.step's __func__) and a callable
    that DeepSpeed builds inside initialize both drive the LR, and torch does not warn that
    optimizer.step was overridden."""
    import ldb_ds

    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, optimizer, _, _ = ldb_ds.initialize(model=make_model(), config=ds_config(0))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for epoch in range(2):  # FULL, DROP
            engine.set_epoch(epoch)
            train_step(engine)
            scheduler.step()
        lrs.append(sorted({g["lr"] for g in optimizer.param_groups}))
        engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=ds_config(0),
                                            lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5))
        for epoch in range(2):
            engine.set_epoch(epoch)
            train_step(engine)  # DeepSpeed steps the scheduler
        lrs.append(sorted({g["lr"] for g in engine.ds_engine.basic_optimizer.param_groups}))
    return lrs, [str(w.message)[:70] for w in caught if "overridden" in str(w.message)]


def _no_set_epoch() -> Any:
    """LDB on, a loop that never calls set_epoch: epoch 0 (FULL) forever, warned once."""
    engine = _engine(1)
    for _ in range(2):
        train_step(engine)
    return engine.ldb.epoch, engine.ldb.steps


def _validation_forward_before_set_epoch() -> Any:
    """LDB on: a validation forward in training mode with gradients on (no step after it) opens a
    window, so the next set_epoch is refused; the message names that cause too."""
    engine = _engine(1)
    engine.set_epoch(0)
    train_step(engine)
    engine(torch.randn(MICRO_BATCH, IN_DIM))  # "validation" without eval() or no_grad
    return engine.set_epoch(1)


def _partial_window_with_ldb_off() -> Any:
    """LDB off, 2 micro steps per window, an epoch of 3: the next set_epoch goes on (DeepSpeed
    carries the window over); with LDB on the same is refused, naming the fix."""
    out = []
    for ldb in ({"enabled": False}, ON):
        config = ds_config(0, ldb)
        config["gradient_accumulation_steps"] = 2
        import ldb_ds

        engine, *_ = ldb_ds.initialize(model=make_model(), config=config)
        engine.set_epoch(0)
        for _ in range(3):
            x = torch.randn(MICRO_BATCH, IN_DIM)
            engine.backward(engine(x).pow(2).mean())
            engine.step()
        try:
            engine.set_epoch(1)
            out.append("went on")
        except RuntimeError as err:
            out.append(str(err))
    return out


ENGINE_CASES: dict[str, Callable[[], Any]] = {
    "step_before_backward_ldb_on_zero2": _step_before_backward(2, ON),
    "step_before_backward_ldb_off_zero0": _step_before_backward(0, {"enabled": False}),
    "second_step_without_backward": _second_step_without_backward,
    "set_epoch_float": _set_epoch(1.5),
    "set_epoch_bool": _set_epoch(True),
    "set_epoch_string": _set_epoch("2"),
    "set_epoch_negative": _set_epoch(-1),
    "disabled_section_not_checked_against_model": _disabled_section_is_not_checked_against_the_model,
    "null_section_warns": _null_section,
    "tied_weights_warned": _tied_weights,
    "full_load_of_plain_checkpoint": _full_load_of("absent"),
    "full_load_of_param_granularity_checkpoint": _full_load_of({**ON, "granularity": "param"}),
    "adamw_object_rebuilt_per_unit": _adamw_object,
    "callable_scheduler_drives_the_engines_optimizer": _callable_scheduler,
    "module_called_directly_in_a_drop_epoch": _module_called_directly,
    "torch_style_backward_at_zero2": _torch_style_backward,
    "user_freeze_kept_with_ldb_off": _user_freeze_with_ldb_off,
    "user_freeze_after_initialize_before_set_epoch": _user_freeze_after_initialize("before_set_epoch"),
    "user_freeze_after_initialize_after_set_epoch": _user_freeze_after_initialize("after_set_epoch"),
    "no_set_epoch_warns": _no_set_epoch,
    "torch_schedulers_at_zero0": _torch_schedulers_at_zero0,
    "scheduler_with_one_value_per_user_group": _per_group_scheduler_list,
    "validation_forward_with_gradients_before_set_epoch": _validation_forward_before_set_epoch,
    "user_freeze_in_a_drop_epoch": _user_freeze_then("drop_window"),
    "user_freeze_then_save_checkpoint": _user_freeze_then("save_checkpoint"),
    "user_freeze_then_eval": _user_freeze_then("eval"),
    "partial_window_at_epoch_end": _partial_window_with_ldb_off,
}


def run_engine_cases(rank: int) -> dict[str, tuple[str, str, list[str]]]:
    """Each case's outcome: (exception type or "ok", message or repr of the result, warnings)."""
    results = {}
    for name, case in ENGINE_CASES.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome = ("ok", repr(case()))
            except Exception as err:  # the test asserts the type and the message
                outcome = (type(err).__name__, str(err))
        if hasattr(case, "after"):  # what a refused case left behind, appended to its message
            outcome = (outcome[0], f"{outcome[1]} | after: {case.after}")
        results[name] = (*outcome, [str(w.message) for w in caught if "ldb_ds" in str(w.message)])
    return results


# --------------------------------------------------------------------------- warm start


def warm_start_from_plain_deepspeed(rank: int, directory: str, stages: tuple[int, ...]) -> dict[int, Any]:
    """Per ZeRO stage: save a plain DeepSpeed checkpoint (deepspeed.initialize, no LDB), warm-start an LDB engine."""
    return {stage: _warm_start(os.path.join(directory, f"zero{stage}"), stage) for stage in stages}


def _full_params(engine: Any) -> dict[str, torch.Tensor]:
    from tests.support.core_workers import gathered_params  # gathered at ZeRO-3 (a collective)

    names, params = zip(*engine.module.named_parameters())
    return dict(zip(names, gathered_params(engine, list(params))))


def _warm_start(directory: str, stage: int) -> dict[str, Any]:
    import deepspeed

    import ldb_ds

    model = make_model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                     config=ds_config(stage, "absent"))
    for step in range(2):
        x = torch.randn(MICRO_BATCH, IN_DIM)
        plain.backward(plain(x).pow(2).mean())
        plain.step()
        if step == 0:
            plain.save_checkpoint(directory, tag="first")
    plain.save_checkpoint(directory, tag="plain")  # the latest tag
    saved = _full_params(plain)
    plain.destroy()

    engine, *_ = ldb_ds.initialize(model=make_model(), config=ds_config(stage, ON))
    # At ZeRO-3 DeepSpeed would load a module-only load's weights from `latest` whatever the tag:
    # another tag is refused there (state_file._zero3_weights_load); elsewhere it loads.
    try:
        engine.load_checkpoint(directory, tag="first", load_module_only=True)
        other_tag = "loaded"
    except ValueError as err:
        other_tag = str(err)
    path, _ = engine.load_checkpoint(directory, load_module_only=True)
    loaded = _full_params(engine)
    for epoch in range(3):  # FULL, DROP, DROP: the fresh optimizer and LDB state train from the weights
        engine.set_epoch(epoch)
        train_step(engine)
    trained = _full_params(engine)
    engine.destroy()
    return {"path": path, "initial": initial, "saved": saved, "loaded": loaded, "trained": trained,
            "other_tag": other_tag, "steps": engine.ldb.steps, "drop_steps": engine.ldb.drop_steps}
