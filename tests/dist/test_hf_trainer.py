"""LDBTrainer on 2 real ranks (gloo): the real transformers.Trainer, Accelerate and DeepSpeed, ZeRO 0-3.

One process group runs every case (start-up dominates these tiny runs): per stage an LDBTrainer
run over a FULL and a DROP epoch that checkpoints at the epoch boundary and mid-DROP-epoch, the
same run through ``ldb_ds.initialize`` on the batches the Trainer fed each rank, and a resume
from each checkpoint; then Trainer epochs that end early (a stream with ``max_steps``,
``should_epoch_stop``), the DeepSpeed JSON's own optimizer with gradient accumulation, and
refusals.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers: "
                                           "pip install 'ldb_ds[hf]'")
pytest.importorskip("accelerate", reason="the Hugging Face integration needs accelerate: pip install 'ldb_ds[hf]'")

from tests.support.dist import run_distributed  # noqa: E402
from tests.support.hf_workers import trainer_cases  # noqa: E402

STAGES = (0, 1, 2, 3)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("hf"))
    return run_distributed(trainer_cases, 2, list(STAGES), workdir, timeout=900)


def test_block_units_come_from_no_split_modules(results):
    r0 = results[0][2]
    # ViTForImageClassification._no_split_modules = ["ViTEmbeddings", "ViTLayer"]; the rest are modules.
    assert r0["units"] == ["block:vit.embeddings", "block:vit.layers.0", "block:vit.layers.1",
                           "block:vit.layers.2", "vit.layernorm", "classifier"]
    # One group per (unit, Trainer weight-decay group): biases and norms keep no decay inside each unit.
    assert r0["groups"] == r0["initialize"]["groups"] > len(r0["units"])


@pytest.mark.parametrize("stage", STAGES)
def test_parity_with_ldb_ds_initialize(results, stage):
    r = results[0][stage]
    masks = [rec["dropped"] for rec in r["steps"]]
    assert [rec["mode"] for rec in r["steps"]] == ["FULL"] * 4 + ["DROP"] * 4
    assert any(masks[4:]), "no unit dropped: the parity would not exercise LDB"
    assert r["initialize"]["masks"] == masks
    # Same initial weights, per-rank batches (the Trainer's, replayed), optimizer, LR and masks.
    # The Trainer computes the loss through its own path (num_items_in_batch, then x world size,
    # no DeepSpeed gradient-accumulation scaling); for this model it rounds to the same fp32
    # values, so the weights agree bitwise. Were data order or loss scaling to differ, only a
    # tolerance could be asserted; the dropped-unit checks stay bitwise either way.
    for n in r["final"]:
        assert torch.equal(r["final"][n], r["initialize"]["final"][n]), n


def test_gradient_checkpointing_trains_the_same_weights(results):
    """TrainingArguments(gradient_checkpointing=True) at ZeRO-2: transformers recomputes each layer
    in the backward (non-reentrant, its default), and LDB's masks and weights are bit for bit
    those of the run without it (docs/support.md: reentrant checkpointing is another matter)."""
    for rank in (0, 1):
        plain, checkpointed = results[rank][2], results[rank]["checkpointed"]
        assert checkpointed["enabled"]
        assert checkpointed["masks"] == [rec["dropped"] for rec in plain["steps"]]
        assert any(checkpointed["masks"])
        for n in plain["final"]:
            assert torch.equal(checkpointed["final"][n], plain["final"][n]), n


@pytest.mark.parametrize("stage", STAGES)
def test_dropped_units_untouched_and_kept_units_train(results, stage):
    for rank in (0, 1):
        drops = [rec for rec in results[rank][stage]["steps"] if rec["dropped"]]
        assert drops
        for rec in drops:
            assert rec["dropped_untouched"] and all(rec["dropped_untouched"].values()), rec
            assert rec["kept_changed"] and all(rec["kept_changed"].values()), "kept units must still train"
            keys = rec["snapshot_keys"]  # parameters, fp32 masters and optimizer state all compared
            assert any(k.startswith("param/") for k in keys) and any("master" in k for k in keys)
            assert any("/state/exp_avg" in k for k in keys)


@pytest.mark.parametrize("stage", STAGES)
def test_no_gradient_bytes_for_dropped_units(results, stage):
    steps = results[0][stage]["steps"]
    full = steps[0]["grad_bytes_expected"]
    for rec in steps:
        # Counted at DeepSpeed's communication backend: exactly the kept units' gradient bytes.
        assert rec["grad_bytes_counted"] == rec["grad_bytes_expected"], (rec["dropped"], rec["reduction_calls"])
        assert (rec["grad_bytes_expected"] < full) == bool(rec["dropped"])


@pytest.mark.parametrize("stage", STAGES)
def test_ranks_agree(results, stage):
    r0, r1 = results[0][stage], results[1][stage]
    assert [rec["dropped"] for rec in r0["steps"]] == [rec["dropped"] for rec in r1["steps"]]
    for n in r0["final"]:
        assert torch.equal(r0["final"][n], r1["final"][n]), n


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_resume_continues_exactly(results, stage):
    for rank in (0, 1):
        r = results[rank][stage]
        assert "global_step6/ldb_state.pt" in r["checkpoint_files"]
        resumed = r["resumed"]
        # Steps 7 and 8 of the uninterrupted run, with the same masks, and the same final weights.
        assert [rec["step"] for rec in resumed["steps"]] == [7, 8]
        assert [rec["dropped"] for rec in resumed["steps"]] == [rec["dropped"] for rec in r["steps"][6:]]
        assert any(rec["dropped"] for rec in resumed["steps"]), "the restored mask stream must be exercised"
        for n in r["final"]:
            assert torch.equal(r["final"][n], resumed["final"][n]), n
        assert resumed["counts"] == r["counts"] == (8, 4)


@pytest.mark.parametrize("stage", STAGES)
def test_resume_at_the_epoch_boundary_enters_the_drop_epoch(results, stage):
    for rank in (0, 1):
        r = results[rank][stage]
        resumed = r["resumed_at_boundary"]
        # The checkpoint's LDB state is in FULL epoch 0; the Trainer resumes at its epoch 1 (DROP).
        assert [rec["step"] for rec in resumed["steps"]] == [5, 6, 7, 8]
        assert [(rec["epoch"], rec["mode"]) for rec in resumed["steps"]] == [(1, "DROP")] * 4
        assert [rec["dropped"] for rec in resumed["steps"]] == [rec["dropped"] for rec in r["steps"][4:]]
        for n in r["final"]:
            assert torch.equal(r["final"][n], resumed["final"][n]), n
        assert resumed["counts"] == r["counts"] == (8, 4)  # the LDB state was read: 4 steps counted before


def test_ldb_epochs_are_the_trainers_epochs_when_epochs_end_early(results):
    for rank in (0, 1):
        r = results[rank]["epochs"]
        # Epochs of 2, 3, 2, 3, 2 steps; state.epoch lags the loop index there (0.17 at epoch 1's start).
        assert r["trainer_epochs"] == [0] * 2 + [1] * 3 + [2] * 2 + [3] * 3 + [4] * 2
        assert r["ldb_epochs"] == r["trainer_epochs"]
        # sampling_rate 2: epoch e is DROP when e % 2 == 0 and e > 0.
        assert r["modes"] == [("DROP" if e % 2 == 0 and e > 0 else "FULL") for e in r["trainer_epochs"]]
        assert any(r["dropped"])
        assert not any("LDB changes nothing" in w for w in r["warnings"]), r["warnings"]
    assert results[0]["epochs"]["dropped"] == results[1]["epochs"]["dropped"]


def test_resume_where_the_trainers_epoch_differs_from_ldbs_warns_and_follows_the_trainer(results):
    for rank in (0, 1):
        r = results[rank]["epochs_resumed"]
        mismatch = [w for w in r["warnings"] if "the Trainer resumed at its epoch" in w]
        assert len(mismatch) == 1 and "its epoch 0 but the checkpoint's LDB state is at epoch 2" in mismatch[0], \
            r["warnings"]
        assert r["trainer_epochs"] and r["ldb_epochs"] == r["trainer_epochs"]


def test_checkpoint_saved_with_every_unit_trainable(results):
    r = results[0][3]
    assert r["steps"][5]["dropped"], "the checkpoint step must have dropped units for this check to mean anything"
    # The Trainer's ZeRO-3 save keeps only parameters that require grad; all of them are there
    # (under transformers' checkpoint names, e.g. vit.encoder.layer.0 for vit.layers.0).
    assert len(r["saved_model_keys"]) == len(r["param_names"])
    assert all(r["flags_after_train"]), "after training every unit is trainable again"


def test_trainer_logs_carry_ldb_figures(results):
    logs = [h for h in results[0][2]["log_history"] if "loss" in h]
    assert [h["LDB/mode"] for h in logs] == [0.0, 0.0, 1.0, 1.0]
    full, drop = logs[0], logs[-1]
    assert full["LDB/kept_unit_fraction"] == 1.0 and full["Comm/grad_bytes_saved"] == 0.0
    assert drop["LDB/lr_factor"] == 2.0 and drop["Train/lr"] == 2.0 * drop["learning_rate"]
    assert any(h["LDB/kept_param_fraction"] < 1.0 and h["Comm/grad_bytes_saved"] > 0 for h in logs[2:])
    for h in logs:
        assert h["Train/samples_per_sec"] > 0 and h["Time/step_ms"] > 0 and h["LDB/batch_factor"] == 1.0


def test_optimizer_section_and_accumulation_boundaries(results):
    for rank in (0, 1):
        r = results[rank]["dsopt"]
        # DeepSpeed built its own optimizer from the JSON over one group per unit.
        assert r["basic_optimizer"] == "AdamW" and r["groups"] == r["units"]
        assert [rec["mode"] for rec in r["steps"]] == ["FULL"] * 2 + ["DROP"] * 2
        by_step: dict[int, list] = {}
        for step, dropped, flags in r["forward_masks"]:
            by_step.setdefault(step, []).append((dropped, flags))
        assert sorted(len(v) for v in by_step.values()) == [2, 2, 2, 2]  # 2 micro batches per step
        # One mask per optimizer step: the same in both micro batches of a window.
        for step, seen in by_step.items():
            assert seen[0] == seen[1], step
            assert seen[0][0] == r["steps"][step]["dropped"]
        assert any(rec["dropped"] for rec in r["steps"])
        assert all(rec["dropped_untouched"] and all(rec["dropped_untouched"].values())
                   for rec in r["steps"] if rec["dropped"])
    assert results[0]["dsopt"]["forward_masks"] == results[1]["dsopt"]["forward_masks"]


def test_refusals_name_the_setting(results):
    errors = results[0]["errors"]
    assert errors["batch_kappa"] and '"batch_kappa": 1' in errors["batch_kappa"]
    assert errors["block"] and errors["block"].startswith("LDBConfigError") and "NoSuchLayer" in errors["block"]
    # The same offload refusals as ldb_ds.initialize, before DeepSpeed builds anything.
    assert errors["nvme"] and "offload_optimizer.device = 'nvme'" in errors["nvme"]


def test_resume_from_a_checkpoint_with_other_param_groups_is_refused_naming_the_warm_start(results):
    """DeepSpeed's own load would fail with a ZeRO parameter-alignment error that does not say why."""
    layout = results[0]["layout"]
    for name, ours in (("ldb_off", "this run has LDB off"), ("module", "granularity 'module'")):
        assert layout[name] and "was saved with LDB on" in layout[name] and "granularity 'block'" in layout[name]
        assert ours in layout[name] and "from_pretrained" in layout[name], layout[name]
        assert not layout[f"{name}_built_an_engine"]  # refused before DeepSpeed was initialized


def test_disabled_is_the_plain_trainer(results):
    off = results[0]["disabled"]
    assert off["groups"] == 2  # the Trainer's own decay / no-decay groups, not split by unit
    assert "_LDBCallback" not in off["callbacks"]
