"""Code that runs inside each rank of tests/dist/test_reliability_dist.py.

Real ldb_ds engines on a real gloo group: non-finite steps at every ZeRO stage, the DROP-batch
pre-check, replica hashes, atomic checkpoints with manifests, and resuming at another world size.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MICRO = 4
CLASSES = 4


def conv_model(dropout: float = 0.2) -> nn.Module:
    """Small CNN with BatchNorm (buffers) and dropout (RNG), same weights on every rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(dropout),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))


def config(stage: int, optimizer: str = "sgd", bf16: bool = False, **ldb: Any) -> dict[str, Any]:
    opt = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}} if optimizer == "sgd" \
        else {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.01, "torch_adam": True}}
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0, "steps_per_print": 10_000,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "optimizer": opt,
           "layer_drop_back": {"enabled": True, "drop_rate": 0.5, "sampling_rate": 1, "keep_first": 1,
                               "keep_last": 1, "batch_kappa": 2, "seed": 3, **ldb}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"buffer_dtype": "bf16"}
    return cfg


def batch(step: int, rank: int, n: int = MICRO, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 3, 8, 8, generator=g).to(dtype), torch.randint(0, CLASSES, (n,), generator=g)


def engine_for(cfg: dict[str, Any], dropout: float = 0.2):
    import ldb_ds

    model = conv_model(dropout)
    engine, _, _, _ = ldb_ds.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    return engine


def train_step(engine, step: int, rank: int, scale: float = 1.0) -> None:
    from ldb_ds.process import input_dtype

    x, y = batch(step, rank, dtype=input_dtype(engine))
    loss = F.cross_entropy(engine(x).float(), y) * scale
    engine.backward(loss)
    engine.step()


def full_params(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def optimizer_tensors(engine) -> list[torch.Tensor]:
    """Every tensor of the basic optimizer's state (momentum, Adam moments), in a fixed order."""
    opt = engine.ds_engine.basic_optimizer
    out = []
    for state in opt.state.values():
        for k in sorted(state):
            if torch.is_tensor(state[k]):
                out.append(state[k].detach().float().clone())
    return out


# --------------------------------------------------------------------------- non-finite steps


def _one_inf_element(grad: torch.Tensor) -> torch.Tensor:
    poisoned = grad.clone()
    poisoned.view(-1)[poisoned.numel() // 2] = float("inf")  # mid-tensor: the kernels' vectorised part
    return poisoned


def nonfinite_cases(rank: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step 1 normal, step 2 poisoned, step 3 normal: what moved and what was counted.

    The poison is a NaN loss (every gradient NaN), or with ``"poison": "one-inf"`` one inf element
    in the middle of the first conv's weight gradient on rank 1 only (the first unit, always kept
    by keep_first=1), before the all-reduce that gives it to every rank."""
    out = []
    for case in cases:
        engine = engine_for(config(case["stage"], bf16=case.get("bf16", False)))
        engine.set_epoch(1)  # a DROP epoch: the mask must survive the skipped step identically
        train_step(engine, 1, rank)
        before_p, before_o = full_params(engine), optimizer_tensors(engine)
        skipped0, steps0, ldb_skipped0 = int(engine.skipped_steps), engine.ldb.steps, engine.ldb.skipped_steps
        rng0 = engine.controller.rng.getstate()
        if case.get("poison") == "one-inf":
            hook = engine.module[0].weight.register_hook(_one_inf_element) if rank == 1 else None
            train_step(engine, 2, rank)
            if hook is not None:
                hook.remove()
        else:
            train_step(engine, 2, rank, scale=float("nan"))
        after_p, after_o = full_params(engine), optimizer_tensors(engine)
        record = {"skipped": int(engine.skipped_steps) - skipped0, "ldb_steps": engine.ldb.steps - steps0,
                  "ldb_skipped": engine.ldb.skipped_steps - ldb_skipped0,
                  "mask_drawn": engine.controller.rng.getstate() != rng0,
                  "params_kept": all(torch.equal(a, b) for a, b in zip(before_p, after_p)),
                  "optimizer_kept": len(before_o) == len(after_o)
                  and all(torch.equal(a, b) for a, b in zip(before_o, after_o)),
                  "mask": list(engine.ldb.dropped_units)}
        train_step(engine, 3, rank)
        record["moved_after"] = any(not torch.equal(a, b) for a, b in zip(after_p, full_params(engine)))
        record["finite_after"] = all(bool(torch.isfinite(p).all()) for p in full_params(engine))
        out.append(record)
        engine.destroy()
    return out


class SparseEmbeddingNet(nn.Module):
    """An ``nn.Embedding(sparse=True)`` (DeepSpeed reduces its gradient sparsely) and two Linears."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.emb(ids).mean(1))))


def sparse_nonfinite(rank: int) -> dict[str, Any]:
    """ZeRO-0 fp32 with a sparse gradient: a NaN step is skipped (the check reads the sparse
    gradient's values), the steps around it train."""
    import ldb_ds

    model = SparseEmbeddingNet()
    cfg = {**config(0), "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    engine, _, _, _ = ldb_ds.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    engine.set_epoch(1)  # DROP: the embedding is the first unit, always kept (keep_first=1)
    out = {"skipped": [], "emb_moved": [], "finite": []}
    for step, scale in enumerate((1.0, float("nan"), 1.0)):
        g = torch.Generator().manual_seed(100 * step + rank)
        ids, y = torch.randint(0, 50, (MICRO, 5), generator=g), torch.randint(0, CLASSES, (MICRO,), generator=g)
        before = model.emb.weight.detach().clone()
        engine.backward(F.cross_entropy(engine(ids), y) * scale)
        out["sparse_grad"] = bool(model.emb.weight.grad is not None and model.emb.weight.grad.is_sparse)
        engine.step()
        out["skipped"].append(int(engine.skipped_steps))
        out["emb_moved"].append(not torch.equal(before, model.emb.weight.detach()))
        out["finite"].append(all(bool(torch.isfinite(p).all()) for p in model.parameters()))
    engine.destroy()
    return out


# --------------------------------------------------------------------------- DROP pre-check


def precheck_cases(rank: int, stages: list[int]) -> list[dict[str, Any]]:
    """Pre-check then two steps vs two steps alone: weights, buffers and RNG must be identical."""
    from ldb_ds.runtime_checks import drop_batch_precheck

    out = []
    for stage in stages:
        results = []
        for with_check in (True, False):
            torch.manual_seed(1234 + rank)
            engine = engine_for(config(stage))
            if with_check:
                x, y = batch(99, rank, n=2 * MICRO)
                drop_batch_precheck(engine, x, lambda o: F.cross_entropy(o.float(), y))
            rng = torch.get_rng_state().clone()
            engine.set_epoch(1)
            for step in (1, 2):
                train_step(engine, step, rank)
            results.append({"params": full_params(engine), "buffers": [b.clone() for b in engine.module.buffers()],
                            "rng": rng, "global_steps": int(engine.global_steps)})
            engine.destroy()
        a, b = results
        out.append({"stage": stage, "params": all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])),
                    "buffers": all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"])),
                    "rng": torch.equal(a["rng"], b["rng"]), "global_steps": (a["global_steps"], b["global_steps"])})
    return out


def precheck_oom(rank: int) -> str:
    """A DROP batch far beyond what the address-space limit allows: every rank gets the same error."""
    import resource

    from ldb_ds.runtime_checks import DropBatchMemoryError, drop_batch_precheck

    engine = engine_for(config(0))
    # Each rank is allowed its current address space plus 2 GiB: the 6 GiB activation of the
    # upsampled input cannot be allocated, whatever the machine's overcommit policy.
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    x = torch.zeros(1, 3, 8, 8).expand(2 * MICRO, 3, 8, 8)
    big = nn.Upsample(scale_factor=1024.0) if rank == 1 else None
    message = ""
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), hard))
    try:
        if big is not None:  # only rank 1 runs out: the verdict must still reach rank 0
            engine.module.insert(0, big)
        drop_batch_precheck(engine, x, lambda o: o.float().mean())
    except DropBatchMemoryError as err:
        message = str(err)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if big is not None:
            del engine.module[0]
    engine.destroy()
    return message


# --------------------------------------------------------------------------- replicas


def replica_checks(rank: int) -> dict[str, str]:
    from ldb_ds.runtime_checks import ReplicaDivergence, check_replicas

    engine = engine_for(config(0))
    engine.set_epoch(1)
    train_step(engine, 1, rank)
    out = {}
    check_replicas(engine)  # identical replicas pass
    out["same"] = "ok"
    first = next(engine.module.parameters())
    original = first.detach().clone()
    if rank == 1:
        with torch.no_grad():
            first.view(-1)[0] += 1.0
    try:
        check_replicas(engine, where="after the test's change")
    except ReplicaDivergence as err:
        out["params"] = f"{err} {err.ranks}"
    if rank == 1:
        with torch.no_grad():
            first.copy_(original)
        engine.controller.dropped = [not d for d in engine.controller.dropped]
    try:
        check_replicas(engine)
    except ReplicaDivergence as err:
        out["mask"] = f"{err} {err.ranks}"
    engine.destroy()
    return out


# --------------------------------------------------------------------------- atomic checkpoints


def checkpoint_files(rank: int, save_dir: str) -> dict[str, Any]:
    import torch.distributed as dist

    from ldb_ds import checkpointing
    from ldb_ds.checkpointing import CheckpointError

    engine = engine_for(config(2))
    engine.set_epoch(1)
    out: dict[str, Any] = {}
    train_step(engine, 1, rank)
    checkpointing.save(engine, save_dir, "a", client_state={"n": 1}, rank_state={"rank": rank}, meta={"k": "a"})
    train_step(engine, 2, rank)
    manifest = checkpointing.save(engine, save_dir, "b", client_state={"n": 2}, rank_state={"rank": rank})
    out["files"] = sorted(manifest["files"])
    out["latest"] = checkpointing.read_latest(save_dir)
    out["own"] = checkpointing.load_rank_state(save_dir, "b", rank)
    out["verify"] = checkpointing.verify(save_dir, "b")["tag"]
    # A save that died half-way: files without a manifest, and 'latest' already pointing at it.
    if rank == 0:
        import shutil

        shutil.copytree(os.path.join(save_dir, "b"), os.path.join(save_dir, "c"))
        os.remove(os.path.join(save_dir, "c", checkpointing.MANIFEST))
        with open(os.path.join(save_dir, "latest"), "w") as f:
            f.write("c")
    dist.barrier()
    warnings: list[str] = []
    out["found"] = checkpointing.find_resumable(save_dir, warn=warnings.append)[0]
    out["warnings_c"] = list(warnings)
    # A truncated optimizer partition of b: caught by the rank that checks it, known to all.
    victim = os.path.join(save_dir, "b", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    if rank == 0:
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) - 10)
    dist.barrier()
    try:
        checkpointing.verify(save_dir, "b")
    except CheckpointError as err:
        out["verify_error"] = str(err)
    warnings.clear()
    out["fallback"] = checkpointing.find_resumable(save_dir, warn=warnings.append)[0]
    out["warnings_b"] = list(warnings)
    if rank == 0:
        out["pruned"] = checkpointing.prune(save_dir, keep_last=1)
    dist.barrier()
    out["left"] = sorted(checkpointing.list_tags(save_dir))
    # Bad tags: refused on every rank before anything is deleted or written (no rank waits).
    outside = os.path.join(os.path.dirname(save_dir), "outside")
    if rank == 0:
        os.makedirs(outside, exist_ok=True)
        with open(os.path.join(outside, "keep.txt"), "w") as f:
            f.write("the user's")
        os.makedirs(os.path.join(save_dir, "mine"))
        with open(os.path.join(save_dir, "mine", "notes.txt"), "w") as f:
            f.write("the user's")
    dist.barrier()
    out["bad_tags"] = []
    for tag in ("../outside", outside, "", "..", "mine"):
        try:
            checkpointing.save(engine, save_dir, tag)
            out["bad_tags"].append("saved")
        except (ValueError, CheckpointError) as err:
            out["bad_tags"].append(f"{type(err).__name__}: {err}")
    dist.barrier()
    out["kept"] = all(os.path.isfile(p) for p in (os.path.join(outside, "keep.txt"),
                                                   os.path.join(save_dir, "mine", "notes.txt")))
    # The unfinished save c (no manifest) is replaced by a save of the same tag.
    checkpointing.save(engine, save_dir, "c")
    out["c_verifies"] = checkpointing.verify(save_dir, "c")["tag"]
    engine.destroy()
    return out


# --------------------------------------------------------------------------- another world size


RESIZE_CASES = [{"stage": 0, "optimizer": "sgd"}, {"stage": 2, "optimizer": "adamw"},
                {"stage": 2, "optimizer": "sgd"}]


def save_for_resize(rank: int, root: str) -> list[list[torch.Tensor]]:
    """At world size 2: two steps, save, then one more step on a known global batch."""
    from ldb_ds import checkpointing

    out = []
    for i, case in enumerate(RESIZE_CASES):
        # No dropout: the two world sizes must compute the same step.
        engine = engine_for(config(case["stage"], case["optimizer"]), dropout=0.0)
        for epoch, step in ((0, 1), (1, 2)):  # a FULL step first: every unit has optimizer state, as in a run
            engine.set_epoch(epoch)
            train_step(engine, step, rank)
        checkpointing.save(engine, os.path.join(root, str(i)), "t", client_state={"case": i})
        engine.set_epoch(0)  # FULL: no mask, so world sizes 1 and 2 take the same step
        x, y = batch(50, 0, n=2 * MICRO)
        half = slice(rank * MICRO, (rank + 1) * MICRO)
        engine.backward(F.cross_entropy(engine(x[half]).float(), y[half]))
        engine.step()
        out.append(full_params(engine))
        engine.destroy()
    return out


def resume_at_world_size_1(rank: int, root: str) -> list[dict[str, Any]]:
    from ldb_ds import checkpoint_fit, checkpointing
    from ldb_ds.checkpointing import CheckpointError
    from ldb_ds.config import LDBConfig

    out = []
    for i, case in enumerate(RESIZE_CASES):
        save_dir = os.path.join(root, str(i))
        cfg = config(case["stage"], case["optimizer"])
        manifest = checkpointing.verify(save_dir, "t")
        current = checkpointing.describe_run(conv_model(0.0), world_size=1, zero_stage=case["stage"],
                                             optimizer=cfg["optimizer"]["type"],
                                             ldb=LDBConfig.from_ds_config(cfg).to_dict())
        try:
            verdict = checkpoint_fit.check_compatible(manifest, current, where="the checkpoint")
        except CheckpointError as err:
            out.append({"error": str(err)})
            continue
        tag = "t"
        if verdict["universal"]:
            tag = checkpoint_fit.to_universal(save_dir, "t")
            cfg["checkpoint"] = {"load_universal": True}
        engine = engine_for(cfg, dropout=0.0)
        _, client = engine.load_checkpoint(save_dir, tag=tag)
        loaded = full_params(engine)
        engine.set_epoch(0)
        x, y = batch(50, 0, n=2 * MICRO)
        # Two micro steps of half the batch (gradient accumulation): the same gradient as two ranks.
        engine.ds_engine.set_train_batch_size(2 * MICRO)
        for half in (slice(0, MICRO), slice(MICRO, 2 * MICRO)):
            engine.backward(F.cross_entropy(engine(x[half]).float(), y[half]))
            engine.step()
        out.append({"universal": verdict["universal"], "notes": verdict["notes"], "client": client.get("case"),
                    "loaded": loaded, "after": full_params(engine), "ldb_steps": engine.ldb.steps,
                    "tags": checkpointing.list_tags(save_dir), "converted_to": tag})
        engine.destroy()
    return out


# --------------------------------------------------------------------------- attached engines


def attached_checkpoint(rank: int, save_dir: str) -> dict[str, Any]:
    """``checkpointing.save``/``verify`` on a raw DeepSpeed engine given LDB by ``ldb_ds.attach``
    (the Hugging Face path): the LDB state file is in the manifest, and it loads back."""
    import deepspeed

    from ldb_ds import checkpointing
    from ldb_ds.attach import STATE_FILE, attach
    from ldb_ds.config import LDBConfig
    from ldb_ds.units import build_units, split_groups_by_unit

    def build():
        cfg = config(2)
        model = conv_model()
        ldb_cfg = LDBConfig.from_ds_config(cfg)
        units = build_units(model, ldb_cfg.granularity)
        groups, unit_of_group = split_groups_by_unit(units, [{"params": list(model.parameters())}])
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
        return engine, attach(engine, ldb_cfg, units, unit_of_group)

    engine, att = build()
    att.set_epoch(1)
    for step in (1, 2):
        x, y = batch(step, rank)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
    manifest = checkpointing.save(engine, save_dir, "t")
    saved = att.controller.state_dict()
    engine.destroy()
    engine, att = build()
    verified = checkpointing.verify(save_dir, "t")
    engine.load_checkpoint(save_dir, tag="t")
    out = {"files": sorted(manifest["files"]), "state_file": STATE_FILE, "ldb": manifest["run"]["ldb"],
           "verified": verified["tag"], "same_state": att.controller.state_dict() == saved, "steps": saved["steps"]}
    engine.destroy()
    return out
