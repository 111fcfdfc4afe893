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
    from ldb_ds.train.data import ShardedEval
    from ldb_ds.train.loop import create_lr_scheduler, distribute_bn, validate
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
