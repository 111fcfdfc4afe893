"""The canonical DeepSpeed script (argparse + ``deepspeed.add_config_arguments``) under the real
``deepspeed`` launcher, 2 CPU ranks: ``ldb_ds.initialize(args=args, ...)`` with no ``config=``."""

import glob
import json
import os

import pytest

from ldb_ds.process import free_port
from tests.support import train_utils as tu

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(tu.REPO, "tests", "support", "canonical_script.py")


def test_canonical_deepspeed_script_under_the_launcher(tmp_path):
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero2_ldb.json",
                          ldb={"sampling_rate": 1, "keep_first": 1, "keep_last": 1, "drop_rate": 0.5},
                          train_micro_batch_size_per_gpu=4)
    out = tmp_path / "out.json"
    port = free_port()
    proc = tu.run([tu.tool("deepspeed"), "--num_gpus", "2", "--master_port", str(port), SCRIPT,
                   "--deepspeed", "--deepspeed_config", cfg, "--out", str(out)], timeout=300)
    assert proc.returncode == 0, tu.explain(proc)
    # DeepSpeed's CPU backend made a 69 MB /dev/shm segment per rank; ldb_ds.initialize released
    # them (the script knows nothing of it), so none outlives the run.
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    r = json.loads(out.read_text())
    assert r["enabled"] is True and r["world_size"] == 2
    assert r["modes"] == ["FULL", "DROP", "DROP"] and r["drop_steps"] == 6
    assert any(r["dropped"][3:]) and not any(r["dropped"][:3])
    assert r["groups"] == r["units"] == 6  # one param group per unit: LDB really runs on the file's section
    # DeepSpeed wrote the rank into args; args keeps the user's config path after initialize.
    assert r["local_rank"] == 0 and r["deepspeed_config"] == cfg
    assert r["all_trainable"] is True  # finish() released the last DROP mask
