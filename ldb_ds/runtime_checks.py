"""Run-time checks: hashes of the weights, replicas that agree, a DROP batch that fits.

* :func:`weights_digest` -- a SHA-256 of the model's parameters (and, separately, its buffers),
  so "this run ended with the same weights as that one" can be checked from outside.
* :func:`check_replicas` -- every rank hashes its copy of the parameters and the LDB mask, the
  hashes are all-gathered and the ranks that differ are named. LDB relies on replicas staying
  identical: ZeRO-1/2 skip the all-gather of dropped groups because every rank already holds
  their values (``zero_hooks.install_allgather_skip``); stage 0 steps every rank's full copy.
* :func:`drop_batch_precheck` -- one forward and backward at the DROP micro batch
  (``batch_kappa`` times the FULL one) before training, so an out-of-memory shows in the first
  minute rather than at the first DROP epoch, with the fix in the message. It leaves no trace:
  no parameter gradient is formed (the backward asks for the input's gradient only, so no ZeRO
  gradient hook fires and no gradient buffer changes), BatchNorm buffers and the RNG states are
  restored, nothing is stepped and DeepSpeed's counters do not move.

docs/design.md, section 8. What is refused before training starts is :mod:`ldb_ds.refusals`.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as torch_dist

from deepspeed.accelerator import get_accelerator

from .checkpointing import controller_of
from .zero_hooks import zero_stage


class ReplicaDivergence(RuntimeError):
    """Data-parallel replicas hold different parameters or masks; the message names the ranks."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class DropBatchMemoryError(RuntimeError):
    """The DROP micro batch does not fit in memory; the message says what to change."""


# --------------------------------------------------------------------------- hashes


def _update(digest: Any, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().contiguous().cpu()
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def named_tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of ``(name, tensor)`` pairs in order: each name, dtype, shape and bytes.

    ``named_tensors_digest(model.named_parameters())`` of a plain model holding the trained
    weights (e.g. loaded from DeepSpeed's ``zero_to_fp32.py`` output) equals the run's
    ``weights_sha256``.
    """
    digest = hashlib.sha256()
    for name, tensor in named:
        _update(digest, name, tensor)
    return digest.hexdigest()


@contextlib.contextmanager
def _gathered(ds_engine: Any, param: torch.nn.Parameter) -> Iterator[torch.Tensor]:
    if zero_stage(ds_engine) == 3 and hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield param
    else:
        yield param


def weights_digest(engine: Any) -> dict[str, str]:
    """``{"params": sha256, "buffers": sha256}`` of the model (names in order, dtypes, shapes, bytes).

    At ZeRO-3 each parameter is gathered in turn (a collective: every rank calls this).
    """
    ds = getattr(engine, "ds_engine", engine)
    params = hashlib.sha256()
    for name, p in ds.module.named_parameters():
        with _gathered(ds, p) as full:
            _update(params, name, full)
    return {"params": params.hexdigest(), "buffers": named_tensors_digest(ds.module.named_buffers())}


def replica_digest(engine: Any) -> dict[str, str]:
    """This rank's hashes of what must be identical on all data-parallel replicas.

    ``mask``: the LDB units dropped now. ``params``: the parameters this rank holds in full
    (stages 0-2); at ZeRO-3 parameters are partitioned, not replicated, so only the mask counts.
    """
    ds = getattr(engine, "ds_engine", engine)
    controller = controller_of(engine)
    mask = bytes(int(d) for d in controller.dropped) if controller is not None else b""
    out = {"mask": hashlib.sha256(mask).hexdigest()}
    if zero_stage(ds) != 3:
        digest = hashlib.sha256()
        for name, p in ds.module.named_parameters():
            _update(digest, name, p)
        out["params"] = digest.hexdigest()
    return out


def check_replicas(engine: Any, *, group: Any = None, where: str = "") -> None:
    """All-gather :func:`replica_digest` and raise :class:`ReplicaDivergence` naming the odd ranks.

    A collective over ``group`` (default: the default group). The reference is the value most
    ranks hold (rank 0's on a tie).
    """
    if not torch_dist.is_initialized() or torch_dist.get_world_size(group) == 1:
        return  # one replica: nothing to compare, and no hashing
    mine = replica_digest(engine)
    everyone: list[Any] = [None] * torch_dist.get_world_size(group)
    torch_dist.all_gather_object(everyone, mine, group=group)
    problems, odd = [], set()
    for key in mine:
        values = [d.get(key) for d in everyone]
        reference = max(values, key=lambda v: (values.count(v), v == values[0]))
        ranks = [r for r, v in enumerate(values) if v != reference]
        if ranks:
            odd.update(ranks)
            problems.append(f"{'parameters' if key == 'params' else 'LDB mask'} of rank(s) "
                            f"{', '.join(map(str, ranks))}")
    if problems:
        raise ReplicaDivergence(f"replicas diverged{' ' + where if where else ''}: " + "; ".join(problems)
                                + " differ from the other ranks'", sorted(odd))


# --------------------------------------------------------------------------- DROP pre-check


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def drop_batch_precheck(engine: Any, inputs: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                        *, group: Any = None) -> None:
    """Run one forward and backward of ``inputs`` (the DROP micro batch) with no update and no trace.

    ``loss_fn(output) -> scalar``. Every rank calls it (ZeRO-3 gathers parameters in the forward;
    the verdict is all-reduced), and every rank raises the same :class:`DropBatchMemoryError`
    if any rank ran out of memory.
    """
    ds = getattr(engine, "ds_engine", engine)
    module = ds.module
    accel = get_accelerator()
    saved = [b.detach().clone() for b in module.buffers()]
    was_training = module.training
    on_device = accel.device_name() != "cpu"
    # The CPU generator always; the accelerator's too when there is one.
    fork = torch.random.fork_rng(devices=[accel.current_device()], device_type=accel.device_name()) \
        if on_device else torch.random.fork_rng(devices=[])
    failure = ""
    with fork:
        module.train()
        try:
            x = inputs.detach().clone().requires_grad_(True)
            # module(x), not engine(x): the LDB engine's forward opens an accumulation window and
            # DeepSpeed's registers backward hooks that count a micro step. Asking for x's gradient
            # only forms no parameter gradient, so no ZeRO reduction hook fires.
            loss = loss_fn(module(x))
            torch.autograd.grad(loss, [x])
            del loss, x
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            failure = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        finally:
            with torch.no_grad():
                for b, s in zip(module.buffers(), saved):
                    b.copy_(s)
            module.train(was_training)
            if on_device:
                accel.empty_cache()
    flag = torch.tensor([1.0 if failure else 0.0], device=accel.current_device_name())
    if torch_dist.is_initialized() and torch_dist.get_world_size(group) > 1:
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=group)
    if float(flag.item()):
        controller = controller_of(engine)
        kappa = controller.cfg.batch_kappa if controller is not None else "batch_kappa"
        raise DropBatchMemoryError(
            f"the DROP epochs' micro batch ({inputs.shape[0]} per rank = {kappa} x the FULL one) does not fit in "
            f"memory{': ' + failure if failure else ' on another rank'}. Set \"batch_scaling\": \"accumulation\" "
            "in the layer_drop_back section (same memory, batch_kappa x the accumulation steps), checkpoint "
            "activations (non-reentrant; ldb-train: --grad-checkpointing), or lower the micro batch")


__all__ = ["ReplicaDivergence", "DropBatchMemoryError", "weights_digest", "named_tensors_digest", "replica_digest",
           "check_replicas", "drop_batch_precheck"]
