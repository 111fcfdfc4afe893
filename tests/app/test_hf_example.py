"""examples/hf_trainer.py through the real ``deepspeed`` launcher on 2 CPU ranks (gloo).

A FULL and a DROP epoch of the Hugging Face Trainer with LDB: the run ends cleanly, LDB's
figures reach the Trainer's TensorBoard logs under the monitor's tag names, and every epoch
checkpoint carries the LDB state file.
"""

from __future__ import annotations

import glob
import json
import os

import pytest

pytest.importorskip("transformers", reason="the example needs the hf extra: pip install 'ldb_ds[hf]'")
pytest.importorskip("accelerate", reason="the example needs the hf extra: pip install 'ldb_ds[hf]'")

from ldb_ds.process import free_port  # noqa: E402
from tests.support.train_utils import REPO, explain, read_scalars, run, tool  # noqa: E402

pytestmark = pytest.mark.slow


def test_example_trains_with_ldb_under_the_deepspeed_launcher(tmp_path):
    with open(os.path.join(REPO, "examples", "ds_config_hf.json")) as f:
        cfg = json.load(f)
    cfg["layer_drop_back"].update(drop_rate=0.5)  # epoch 2 is DROP (sampling_rate 2)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    proc = run([tool("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                os.path.join(REPO, "examples", "hf_trainer.py"), "--deepspeed", str(ds), "--output-dir", str(out),
                "--epochs", "3", "--max-train-samples", "256", "--layers", "2"], timeout=600)
    assert proc.returncode == 0, explain(proc)
    assert "LDB: 5 units (block:vit.embeddings, block:vit.layers.0, block:vit.layers.1, vit.layernorm, classifier)" \
        in proc.stdout, explain(proc)
    assert "test accuracy" in proc.stdout

    # Hugging Face's TensorBoard reporter puts training keys under train/.
    events = sorted({os.path.dirname(p) for p in glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)})
    assert events, f"no TensorBoard event file under {out}"
    scalars = {}
    for d in events:
        scalars.update(read_scalars(d))
    for tag in ("LDB/mode", "LDB/kept_unit_fraction", "LDB/kept_param_fraction", "LDB/lr_factor",
                "Comm/grad_bytes", "Comm/grad_bytes_saved", "Train/samples_per_sec", "Train/lr", "Time/step_ms"):
        assert f"train/{tag}" in scalars, sorted(scalars)
    modes = [v for _, v in scalars["train/LDB/mode"]]
    assert modes[0] == 0.0 and modes[-1] == 1.0
    assert max(v for _, v in scalars["train/Comm/grad_bytes_saved"]) > 0  # the DROP epoch sent fewer bytes

    checkpoints = sorted(glob.glob(str(out / "checkpoint-*")))
    assert checkpoints
    for ckpt in checkpoints:
        assert glob.glob(os.path.join(ckpt, "global_step*", "ldb_state.pt")), os.listdir(ckpt)
