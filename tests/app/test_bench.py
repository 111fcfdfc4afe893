"""The benchmark runs end to end at a tiny size and writes well-formed JSON, Markdown, PNG and
TensorBoard files. No timing is asserted: timings on a shared CI machine mean nothing.

Three subprocesses (about 30 s, 60 s and 40 s on 2 cores): every measuring mode at world size 1 in
one process, the scaling driver at world sizes 1 and 2 through the real deepspeed launcher, and
the projection at world size 2 through the deepspeed launcher. The projection's arithmetic is
tested directly as well.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldb_ds.bench import alphabeta as ab, bench_arguments, bench_options, dispatch  # noqa: E402
from ldb_ds.bench import report as bench_report, scaling, step  # noqa: E402
from ldb_ds.bench.epochs import steady_epochs  # noqa: E402

TINY = ["--model", "test_efficientnet", "--img-size", "16", "--batch-size", "4", "--zero-stage", "2",
        "--warmup-rounds", "1", "--rounds", "1", "--steps-per-round", "1", "--byte-steps", "2", "--dw-reps", "1",
        "--samples-per-rank", "16", "--periods", "1", "--reps", "2", "--warmup-steps", "1", "--loader-workers", "1",
        "--drop-rates", "0.3,0.6", "--sampling-rates", "1,2", "--sweep-reps", "1", "--acc-epochs", "2",
        "--acc-limit", "32", "--count-stages", "0,2", "--count-steps", "1", "--project-reps", "1", "--quiet"]
MEASURING = ["step", "epochs", "sweep-drop-rate", "sweep-sampling-rate", "accuracy", "counts"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions")),
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    return env


def _run(args: list[str], timeout: float) -> None:
    proc = subprocess.run([sys.executable, "-m", "ldb_ds.bench", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    # The step mode's DROP steps at the FULL batch are on purpose: no warning about them.
    assert "expects micro batches" not in proc.stderr + proc.stdout, proc.stderr[-4000:]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_files(out: str, mode: str) -> dict:
    path = os.path.join(out, f"{mode}.json")
    with open(path) as f:
        res = json.load(f)  # well-formed JSON
    assert res["schema"] == bench_report.SCHEMA and res["mode"] == mode
    c = res["conditions"]
    for key in ("device", "cpu_model", "world_size", "model", "micro_batch_per_rank", "precision", "zero_stage",
                "backend", "timing", "versions", "command"):
        assert c.get(key) not in (None, ""), f"{mode}: condition {key} missing"
    md = open(os.path.join(out, f"{mode}.md")).read()
    assert md.startswith(f"### ldb_ds benchmark: {mode}") and "Conditions:" in md
    assert md.count("\n|") >= 3, md  # at least one table with a header, a rule and a row
    with open(os.path.join(out, f"{mode}.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(os.path.join(out, f"{mode}.png"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert glob.glob(os.path.join(out, "tb", mode, "events.out.tfevents.*")), f"{mode}: no TensorBoard file"
    return res


@pytest.fixture(scope="module")
def ws1_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench_ws1"))
    _run([",".join(MEASURING), *TINY, "--profile", "--out", out], timeout=300)
    return out


@pytest.mark.parametrize("mode", MEASURING)
def test_mode_writes_well_formed_outputs(ws1_results, mode):
    res = _check_files(ws1_results, mode)
    r = res["results"]
    assert res["conditions"]["world_size"] == 1
    if mode == "step":
        assert set(r["variants"]) == set(step.VARIANTS)
        for v in r["variants"].values():
            assert v["total_s"]["n"] >= 1 and _finite(v["total_s"]["median"])
        k = r["key_figures"]
        for key in ("drop_over_full_measured", "drop_over_full_predicted_dw", "dw_share_of_full"):
            assert _finite(k[key]), key
        assert k["drop_over_oracle"]["n"] >= 1
        b = r["bytes"]
        assert b["full_counted"] == b["full_expected"] > 0  # counted, not estimated
        assert b["drop_counted_mean"] == b["drop_expected_mean"] < b["full_counted"]
        assert r["profile"] and r["profile"]["ldb_drop"]
    elif mode == "epochs":
        assert r["modes"] == ["FULL", "DROP"] and len(r["per_rep"]["speedup"]) == 2
        assert _finite(r["speedup"]["median"]) and r["steps"]["ldb"] < r["steps"]["baseline"]  # 2x DROP batches
        # Each timed epoch's first step apart (the baseline's 2 epochs are both FULL), inside its epoch's time.
        first = r["first_step_s"]
        assert set(first) == {"baseline_FULL", "ldb_FULL", "ldb_DROP"}
        assert [first[k]["n"] for k in first] == [r["epoch_s"][k]["n"] for k in first] and first["ldb_DROP"]["n"] == 2
        assert all(0 < first[k]["max"] <= r["epoch_s"][k]["max"] for k in first)
        assert _finite(r["full_epoch_over_baseline_after_first_step"])
        # The loader's share, per timed epoch: a persistent worker (whose batches still follow the mode:
        # fewer LDB steps above), and the host's wait for it within each epoch's time.
        waits = r["loader_wait_s"]
        assert r["loader_workers"] == 1 and set(waits) == set(first)
        assert [waits[k]["n"] for k in waits] == [r["epoch_s"][k]["n"] for k in waits]
        assert all(0 < waits[k]["min"] and waits[k]["max"] < r["epoch_s"][k]["max"] for k in waits)
        assert "without each epoch's first step" in open(os.path.join(ws1_results, "epochs.md")).read()
    elif mode.startswith("sweep"):
        assert [row["value"] for row in r["rows"]] == ([0.3, 0.6] if mode == "sweep-drop-rate" else [1, 2])
        assert all(_finite(row["speedup"]["median"]) for row in r["rows"])
    elif mode == "accuracy":
        assert r["epochs"] == 2 and len(r["per_epoch"]) == 2
        assert 0.0 <= r["baseline"]["final_top1"] <= 100.0 and 0.0 <= r["ldb"]["final_top1"] <= 100.0
        assert _finite(r["speedup"])
    elif mode == "counts":
        assert [t["zero_stage"] for t in r["tables"]] == [0, 2]
        for t in r["tables"]:
            base, full, drop = (t["rows"][k] for k in ("baseline_full", "ldb_full", "ldb_drop"))
            n = full["param_groups"]
            assert t["foreach_forced"] and base["param_groups"] == 1 and n == t["units"] > 1
            # Per-unit groups at no per-group cost (issue 10, item 2): the groups (all of equal
            # hyperparameters here) are stepped as one, so the optimizer's foreach kernel set runs
            # once, as the baseline's, in FULL and DROP steps. At ZeRO-2 ldb_ds's step loop adds one
            # launch: the kept groups' fp32 -> bit16 copy-back is one _foreach_copy_ (DeepSpeed's
            # loop: one copy_ per group, so the baseline's single group has one copy_), and the
            # gradient norms of all kept groups are one _foreach_norm (norms.group_square_sums;
            # DeepSpeed: a vector_norm per tensor, not a foreach op).
            # At ZeRO-0 in fp32 the non-finite skip, installed with LDB on only (plain DeepSpeed has
            # none there), adds its one multi-tensor check (torch's GradScaler op).
            extra = {"aten::_foreach_copy_": 1, "aten::_foreach_norm": 1} if t["zero_stage"] == 2 \
                else {"aten::_amp_foreach_non_finite_check_and_unscale_": 1}
            ops = {k: v - extra.get(k, 0) for k, v in full["ops"]["optimizer"]["foreach_fused"].items()}
            assert base["foreach_fused_ops_optimizer"] > 0
            assert {k: v for k, v in ops.items() if v} == base["ops"]["optimizer"]["foreach_fused"]
            assert drop["foreach_fused_ops_optimizer"] == full["foreach_fused_ops_optimizer"]
            # One optimizer call per step at every stage (ZeRO-2: ldb_ds's own step loop, not
            # DeepSpeed's call per group), showing every group in a FULL step.
            assert full["optimizer_calls"] == drop["optimizer_calls"] == full["torch_optimizer_steps"] == 1
            assert full["groups_presented"] == n
            if t["zero_stage"] == 2:  # ldb_ds's ZeRO-2 loop does not even show the dropped groups
                assert drop["groups_presented"] == n - drop["dropped_units"] < n
            else:  # stage 0: DeepSpeed shows every group, the step filter hides the dropped ones
                assert drop["groups_presented"] == n
            assert full["grad_bytes"] == base["grad_bytes"] > drop["grad_bytes"] > 0


def test_report_rerenders_from_json(ws1_results, tmp_path, capsys):
    import shutil

    shutil.copy(os.path.join(ws1_results, "step.json"), tmp_path / "step.json")
    # Other JSON beside it (a list, not JSON at all, a folder named like one): said and skipped.
    (tmp_path / "a_list.json").write_text("[1, 2, 3]")
    (tmp_path / "notes.json").write_text("not json")
    (tmp_path / "folder.json").mkdir()
    assert dispatch.main(["report", str(tmp_path), "--no-tensorboard"]) == 0
    assert (tmp_path / "step.md").read_text() == open(os.path.join(ws1_results, "step.md")).read()
    assert (tmp_path / "step.png").exists()
    out = capsys.readouterr().out
    assert "a_list.json is not a benchmark result (a JSON list, not an object)" in out
    assert "skipped" in out and "notes.json" in out and "folder.json" not in out


def test_scaling_world_sizes_1_and_2_through_deepspeed_launcher(tmp_path):
    out = str(tmp_path / "scaling")
    _run(["scaling", "--world-sizes", "1,2", *TINY, "--reps", "1", "--out", out], timeout=400)
    res = _check_files(out, "scaling")
    rows = res["results"]["rows"]
    assert [row["world_size"] for row in rows] == [1, 2]
    for row in rows:
        assert _finite(row["speedup"]["median"]) and row["bytes_full"] > row["bytes_drop_mean"] > 0
    ws2 = json.load(open(os.path.join(out, "ws2", "step.json")))
    assert ws2["conditions"]["world_size"] == 2 and ws2["conditions"]["backend"] == "gloo"


def test_helpers():
    s = bench_report.stats([3.0, 1.0, 2.0, 4.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["q1"] == 1.75 and s["n"] == 4
    assert bench_report.stats([])["n"] == 0
    argv = ["scaling", "--world-sizes", "1,2", "--model", "m", "--out=x", "--launcher", "torchrun", "--profile"]
    assert scaling.strip_options(argv, scaling.SCALING_ONLY) == ["--model", "m", "--profile"]
    assert steady_epochs(2, 2) == [1, 2, 3, 4]
    assert bench_arguments.parse_modes("step,epochs") == ["step", "epochs"]
    with pytest.raises(SystemExit):
        bench_arguments.parse_modes("step,bogus")


def test_flags_are_generated_from_the_typed_options():
    import dataclasses

    from ldb_ds.config import LDBConfig

    opts = bench_arguments.parse(["step", "--drop-rates", "0.1,0.5", "--zero-stage", "3", "--drop-rate", "0.4",
                          "--ldb-seed", "7", "--note", "a", "--note", "b", "--profile", "--acc-limit", "10"])
    assert opts.modes == ["step"] and opts.epochs.drop_rates == (0.1, 0.5) and opts.run.zero_stage == 3
    assert opts.ldb == {"drop_rate": 0.4, "seed": 7}  # only what was given: the rest keeps LDBConfig's defaults
    assert opts.output.note == ["a", "b"] and opts.step.profile and opts.epochs.acc_limit == 10
    assert bench_arguments.parse(["step"]).run == bench_options.RunOptions()  # one source of defaults
    parser = bench_arguments.build_parser()
    helps = {s: a.help for a in parser._actions for s in a.option_strings}
    for cls in bench_options.GROUPS.values():
        docs = bench_arguments.field_docs(cls)
        for f in dataclasses.fields(cls):  # every field is a flag, documented by its docstring
            assert docs.get(f.name) and helps[bench_options.flag_of(f.name)].startswith(docs[f.name].replace("%", "%%"))
    ldb_keys = [f.name for f in dataclasses.fields(LDBConfig) if f.name not in bench_arguments.LDB_EXCLUDED]
    assert all(bench_arguments.LDB_FLAGS.get(k, bench_options.flag_of(k)) in helps for k in ldb_keys)
    for bad in (["step", "--zero-stage", "5"], ["step", "--drop-rates", "x,y"], ["step", "--rounds", "0"],
                ["step", "--granularity", "layer"], ["bogus"]):
        with pytest.raises(SystemExit):
            bench_arguments.parse(bad)


def test_alpha_beta_model_structure():
    links = ab.Links()
    kinds = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "all_reduce_coalesced")
    for kind in kinds:
        assert ab.collective_time(kind, 1e6, 1, links) == 0.0  # one rank: no communication
        for w in (2, 8, 16, 64, 1024):
            for algo in ("ring", "tree", "auto"):
                times = [ab.collective_time(kind, n, w, links, algo) for n in (0, 1e3, 1e6, 1e8, 1e9)]
                assert all(a < b for a, b in zip(times, times[1:])), (kind, w, algo, times)  # monotone in size
            ring, tree = (ab.collective_time(kind, 1e7, w, links, a) for a in ("ring", "tree"))
            auto = ab.collective_time(kind, 1e7, w, links)
            # auto picks per level: the faster of the two inside a node, and again across nodes
            assert auto == min(ring, tree) if w <= links.gpus_per_node else auto <= min(ring, tree)
    # Crossing the node boundary moves traffic to the slower inter-node link.
    assert ab.collective_time("all_reduce", 1e8, 16, links) > ab.collective_time("all_reduce", 1e8, 8, links)
    # Ring latency grows with the ranks; a tree's only with their logarithm.
    small = [ab.collective_time("all_reduce", 8, w, links, "ring") for w in (16, 64, 256, 1024)]
    assert all(a < b for a, b in zip(small, small[1:]))
    assert ab.collective_time("all_reduce", 8, 1024, links, "tree") < small[-1] / 10
    # A step at one rank is exactly its compute and optimizer inputs.
    opt = ab.OptimizerCost(call=1e-5, group=2e-5, element=1e-9)
    messages = [ab.Message("all_reduce", 4e7), ab.Message("all_gather_into_tensor", 4e7, 0.5)]
    v = ab.Variant(forward=0.01, backward=0.02, optimizer_calls=3, optimizer_groups=3, optimizer_elements=1e7,
                   messages=messages)
    t1 = ab.step_time(v, 1, 2, opt, links)
    assert t1.comm == t1.comm_exposed == 0.0 and t1.total == pytest.approx(0.03 + opt.time(3, 3, 1e7))
    t64 = [ab.step_time(v, 64, 2, opt, links, overlap=o) for o in (0.0, 0.5, 1.0)]
    assert t64[0].comm_exposed == t64[0].comm > t64[1].comm_exposed > t64[2].comm_exposed > 0  # gathers exposed
    assert t64[2].comm_exposed >= t64[2].comm - v.backward  # hidden at most behind the backward pass
    assert t64[0].optimizer < t1.optimizer  # ZeRO partitions the elements over the ranks
    # No saving when LDB's steps cost the same per sample as the baseline's.
    assert ab.schedule_speedup(1.0, 1.0, 2.0, 2, 2) == pytest.approx(0.0)
    assert ab.schedule_speedup(1.0, 1.0, 1.0, 2, 2) == pytest.approx(0.25)
    lat, bw = ab.fit_alpha_beta([1e3, 1e5, 1e7], [2 * 5e-6 + n / 1e9 for n in (1e3, 1e5, 1e7)], 2)
    assert lat == pytest.approx(5e-6) and bw == pytest.approx(1e9)


def test_project_at_world_size_2_through_deepspeed_launcher(ws1_results, tmp_path):
    from ldb_ds.process import free_port

    out = str(tmp_path / "project")
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [exe, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ldb_ds.bench", "project",
           *TINY, "--calibrate-comm", "--project-world-sizes", "1,2,16,1024",
           "--validate", os.path.join(ws1_results, "step.json"), "--validate", os.path.join(ws1_results, "epochs.json"),
           "--compute-scales", "1,100", "--out", out]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    res = _check_files(out, "project")
    r = res["results"]
    assert res["conditions"]["world_size"] == 2 and [row["world_size"] for row in r["rows"]] == [1, 2, 16, 1024]
    inp = r["inputs"]
    # Counted at 2 ranks: after the step ZeRO-2 all-gathers the kept groups' partitions in one
    # collective (ldb_ds's step loop), as the baseline gathers its one group.
    counted = inp["counts"]["rows"]
    gathers = {k: counted[k]["collectives"].get("all_gather_into_tensor", {}).get("calls") for k in counted}
    assert gathers["baseline_full"] == gathers["ldb_full"] == gathers["ldb_drop"] == 1
    assert counted["ldb_full"]["param_groups"] > 1
    assert counted["ldb_drop"]["collectives"]["broadcast"]["calls"] == 1  # the mask, rank 0 to all
    fit = inp["comm_fit"]
    assert fit["latency_us"] >= 0 and fit["bandwidth_gbs"] > 0
    # At one rank the projection reproduces its own inputs: compute plus the optimizer model, no comm.
    one = r["rows"][0]
    full = inp["compute"]["full"]["model"]
    oc, base_v = inp["optimizer"], r["variants"]["baseline"]
    expected = full["forward_s"] + full["backward_s"] + (oc["call_s"] * base_v["optimizer_calls"] + oc["group_s"]
                                                         * base_v["optimizer_groups"] + oc["element_s"]
                                                         * base_v["optimizer_elements"])
    assert one["baseline"]["total_s"] == pytest.approx(expected)
    for name in ("baseline", "ldb_full", "ldb_drop", "ldb_drop_kb"):
        assert one[name]["comm_s"] == 0.0 and one[name]["total_s"] == pytest.approx(
            one[name]["compute_s"] + one[name]["optimizer_s"])
        assert all(row[name]["comm_s"] > 0 for row in r["rows"][1:])
    assert r["rows"][-1]["baseline"]["comm_s"] > r["rows"][1]["baseline"]["comm_s"]
    assert all(_finite(row["speedup"]) for row in r["rows"])
    steps, epochs = r["validation"]
    assert steps["world_size"] == epochs["world_size"] == 1 and not steps["mismatch"] and not epochs["mismatch"]
    assert all(_finite(e["error"]) for e in steps["steps"].values()) and _finite(epochs["speedup"]["error_points"])
    # A faster device leaves communication a larger share of the step.
    fast, slow = r["scenarios"]["100.0"], r["scenarios"]["1.0"]
    assert fast["comm_share_baseline"][-1] > slow["comm_share_baseline"][-1] > 0
