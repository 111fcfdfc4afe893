"""The loop's timm pieces on a real 2-rank engine (gloo): scheduler x LDB factor, BN sync, eval.

One process group for all checks (start-up dominates). The values are checked against what
the rules say, computed independently here: the update a kept unit receives, the mean of the
ranks' BatchNorm statistics, the accuracy over the whole test set computed without sharding.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.dist import run_distributed

pytestmark = pytest.mark.slow

CLASSES, TEST_IMAGES = 6, 11  # an odd count: the two ranks' shards differ in size


def _model():
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES))


def _worker(rank: int) -> dict:
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import ldb_ds
    from ldb_ds.train.loop import create_lr_scheduler, distribute_bn
    from ldb_ds.workloads.data import ShardedEval
    from ldb_ds.workloads.evaluation import validate
    from ldb_ds.train.options import TrainOptions

    torch.manual_seed(0)
    model = _model()
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 0},
           "layer_drop_back": {"enabled": True, "sampling_rate": 1, "keep_first": 1,
                               "keep_last": 0, "drop_rate": 0.5, "lr_policy": "kappa",
                               "kappa": 2.0, "batch_kappa": 1}}
    engine, _, _, _ = ldb_ds.initialize(model=model, model_parameters=list(model.parameters()),
                                        config=cfg)
    sched = create_lr_scheduler(TrainOptions(epochs=3, warmup_epochs=1, min_lr=0.01),
                                engine.optimizer)
    first = engine.module[0].weight  # unit 0: never dropped (keep_first=1)
    out = {"steps": []}
    for epoch in range(3):
        sched.step(epoch)
        mode = engine.set_epoch(epoch)
        engine.train()
        scheduled = float(engine.get_lr()[0])
        g = torch.Generator().manual_seed(10 * epoch + rank)
        x = torch.randn(4, 3, 8, 8, generator=g) + rank  # rank-dependent BatchNorm statistics
        y = torch.randint(0, CLASSES, (4,), generator=g)
        engine.backward(F.cross_entropy(engine(x), y))
        grad = first.grad.detach().clone()  # ZeRO 0: averaged over the ranks by now
        before = first.detach().clone()
        engine.step()
        out["steps"].append({"mode": mode.value, "scheduled": scheduled,
                             "lr_after": float(engine.get_lr()[0]),
                             "update": before - first.detach(), "grad": grad,
                             "factor": engine.ldb.lr_factor})

    bn = engine.module[1]
    out["bn_before"] = (bn.running_mean.clone(), bn.running_var.clone())
    distribute_bn(engine.module, "reduce")
    out["bn_reduced"] = (bn.running_mean.clone(), bn.running_var.clone())
    bn.running_var.add_(rank + 1.0)
    out["bn_var_before_broadcast"] = bn.running_var.clone()
    distribute_bn(engine.module, "broadcast")
    out["bn_broadcast"] = bn.running_var.clone()
    half = torch.nn.BatchNorm2d(3).to(torch.bfloat16)  # bf16 buffers (bf16 configs) over gloo
    half.running_mean.fill_(float(rank + 1))
    distribute_bn(half, "reduce")
    out["bf16_mean"] = half.running_mean.clone()

    g = torch.Generator().manual_seed(99)
    images = torch.randn(TEST_IMAGES, 3, 8, 8, generator=g)
    labels = torch.randint(0, CLASSES, (TEST_IMAGES,), generator=g)
    loader = DataLoader(ShardedEval(TensorDataset(images, labels), rank, 2), batch_size=4)
    out["validate"] = validate(engine, loader)
    engine.module.eval()
    with torch.no_grad():  # the whole test set on this rank, without timm and without sharding
        logits = engine.module(images)
    top5 = logits.topk(5, dim=1).indices
    out["direct"] = {"top1": 100.0 * int((top5[:, 0] == labels).sum()) / TEST_IMAGES,
                     "top5": 100.0 * int((top5 == labels[:, None]).any(1).sum()) / TEST_IMAGES,
                     "loss": float(F.cross_entropy(logits, labels))}
    engine.destroy()
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_worker, 2, timeout=300)


def test_cosine_scheduler_and_ldb_factor_compose(ranks):
    steps = ranks[0]["steps"]
    assert [s["mode"] for s in steps] == ["FULL", "DROP", "DROP"]
    # timm's schedule: warm-up 0.1 / 2, then the cosine from 0.1 to 0.01 over 2 epochs.
    expected = [0.05, 0.1, 0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi / 2))]
    assert [s["scheduled"] for s in steps] == pytest.approx(expected)
    for s in steps:
        factor = 2.0 if s["mode"] == "DROP" else 1.0
        assert s["factor"] == factor
        # The step applied scheduled LR x factor (plain SGD: update = lr x gradient) ...
        assert torch.allclose(s["update"], s["scheduled"] * factor * s["grad"], rtol=1e-5,
                              atol=1e-8)
        assert s["grad"].abs().sum() > 0
        # ... and left the scheduler's value in the param group, not the multiplied one.
        assert s["lr_after"] == s["scheduled"]


def test_distribute_bn_reduces_and_broadcasts(ranks):
    before = [r["bn_before"] for r in ranks]
    assert not torch.equal(before[0][0], before[1][0])  # the ranks saw different data
    for i in (0, 1):  # running_mean, running_var
        mean = (before[0][i] + before[1][i]) / 2
        for r in ranks:
            assert torch.allclose(r["bn_reduced"][i], mean, rtol=1e-6)
    assert not torch.equal(ranks[0]["bn_var_before_broadcast"], ranks[1]["bn_var_before_broadcast"])
    for r in ranks:
        assert torch.equal(r["bn_broadcast"], ranks[0]["bn_var_before_broadcast"])
        assert torch.equal(r["bf16_mean"], torch.full((3,), 1.5, dtype=torch.bfloat16))


def test_validate_is_exact_over_the_shards(ranks):
    a, b = (r["validate"] for r in ranks)
    assert a == b  # one all-reduce: every rank gets the same figures
    direct = ranks[0]["direct"]
    assert ranks[1]["direct"] == direct  # the ranks hold the same model after distribute_bn
    assert a["top1"] == pytest.approx(direct["top1"], abs=1e-9)
    assert a["top5"] == pytest.approx(direct["top5"], abs=1e-9)
    assert a["loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert a["top5"] > a["top1"] or a["top5"] == 100.0


class _Batches:
    """A loader stand-in: ``n`` batches; batch ``fail_at`` raises ``error`` (a real exception)."""

    def __init__(self, n: int, fail_at: int = -1, error: Exception | None = None):
        self.n, self.fail_at, self.error = n, fail_at, error

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail_at:
                raise self.error
            yield torch.full((2,), float(i))


def _run_agreed(loader, count: int, group, stop_after: int | None = None) -> dict:
    """Train-step stand-in: one all-reduce on the default group per batch, as a step's gradients."""
    import torch.distributed as dist

    from ldb_ds.workloads.batches import agreed_batches

    stepped = 0
    try:
        for batch in agreed_batches(loader, count, group):
            dist.all_reduce(batch)
            stepped += 1
            if stop_after is not None and stepped == stop_after:
                break
    except Exception as err:  # noqa: BLE001 - the test looks at which error each rank got
        return {"stepped": stepped, "error": type(err).__name__, "message": str(err)}
    return {"stepped": stepped, "error": None}


def _data_worker(rank: int) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import ldb_ds
    from ldb_ds.train.faults import gloo_group
    from ldb_ds.workloads.data import BadImageError, ShardedEval
    from ldb_ds.workloads.evaluation import validate

    group = gloo_group(60.0)
    out = {}
    bad = BadImageError("unreadable image /data/b/3.png: OSError: truncated. Remove or replace the file, "
                        "or pass --skip-bad-images")
    out["bad_image"] = _run_agreed(_Batches(6, fail_at=3 if rank == 1 else -1, error=bad), 6, group)
    out["crash"] = _run_agreed(_Batches(6, fail_at=1 if rank == 0 else -1, error=ValueError("worker bug")), 6, group)
    out["early_stop"] = _run_agreed(_Batches(10), 5, group, stop_after=2)
    flag = torch.ones(1)
    dist.all_reduce(flag, group=group)  # the group is usable after an early stop (nothing left pending)
    out["group_after_stop"] = float(flag)
    out["short"] = _run_agreed(_Batches(2 if rank == 1 else 4), 4, group)

    # ZeRO-3 evaluation over an odd number of images: every forward all-gathers parameters, so
    # the shards must have equal lengths (padding that is not counted).
    torch.manual_seed(0)
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = ldb_ds.initialize(model=_model(), config=cfg)
    g = torch.Generator().manual_seed(99)
    images = torch.randn(TEST_IMAGES, 3, 8, 8, generator=g)
    labels = torch.randint(0, CLASSES, (TEST_IMAGES,), generator=g)
    loader = DataLoader(ShardedEval(TensorDataset(images, labels), rank, 2), batch_size=1)
    out["zero3_batches"] = len(loader)
    out["zero3_validate"] = validate(engine, loader, data_group=group)
    engine.eval()
    with torch.no_grad():
        out["zero3_loss"] = float(F.cross_entropy(engine(images).float(), labels))
    engine.destroy()
    return out


@pytest.fixture(scope="module")
def data_ranks():
    return run_distributed(_data_worker, 2, timeout=300)


def test_a_bad_batch_stops_every_rank_before_its_step(data_ranks):
    r0, r1 = (r["bad_image"] for r in data_ranks)
    # Three batches trained everywhere; no rank entered the fourth batch's collective.
    assert r0["stepped"] == r1["stepped"] == 3, (r0, r1)
    assert r1["error"] == "BadImageError" and "/data/b/3.png" in r1["message"]
    assert r0["error"] == "DatasetError"
    assert r0["message"].startswith("rank 1 could not load its batch: unreadable image /data/b/3.png")
    assert "--skip-bad-images" in r0["message"]


def test_a_crashed_loader_is_reported_to_the_other_ranks(data_ranks):
    r0, r1 = (r["crash"] for r in data_ranks)
    assert r0 == {"stepped": 1, "error": "ValueError", "message": "worker bug"}
    assert r1["stepped"] == 1 and r1["error"] == "PeerBatchError"
    assert r1["message"] == "rank 0 could not load its batch: worker bug"


def test_early_stop_and_unequal_lengths(data_ranks):
    for r in data_ranks:
        assert r["early_stop"] == {"stepped": 2, "error": None}
        assert r["group_after_stop"] == 2.0
        short = r["short"]
        assert short["stepped"] == 2 and short["error"] == "RuntimeError", short
        assert "rank(s) [1] ran out of batches" in short["message"]


def test_zero3_validate_over_an_odd_test_set(data_ranks):
    a, b = data_ranks
    assert a["zero3_batches"] == b["zero3_batches"] == 6  # 6 images per shard, one of them padding
    assert a["zero3_validate"] == b["zero3_validate"]
    assert a["zero3_validate"]["loss"] == pytest.approx(a["zero3_loss"], rel=1e-5)
