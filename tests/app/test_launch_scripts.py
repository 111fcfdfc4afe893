"""The launch scripts' own logic, without a cluster: launch/multinode.sh --dry-run."""

import os
import subprocess

from tests.support import train_utils as tu

SCRIPT = os.path.join(tu.REPO, "launch", "multinode.sh")


def _dry_run(tmp_path, hostfile, home_env=None, **env):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    if home_env is not None:
        (home / ".deepspeed_env").write_text(home_env)
    e = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "DS_ENV_FILE", "LAUNCHER")}
    e.update(HOME=str(home), HOSTFILE=str(hostfile), TMPDIR=str(tmp_path), **env)
    return subprocess.run(["bash", SCRIPT, "--dry-run", "--model", "resnet50"], env=e, capture_output=True,
                          text=True, timeout=60)


def _lines(proc, prefix):
    return [line[len(prefix):] for line in proc.stdout.splitlines() if line.startswith(prefix)]


def test_master_addr_is_the_first_host_of_the_example_hostfile(tmp_path):
    proc = _dry_run(tmp_path, os.path.join(tu.REPO, "launch", "hostfile.example"))
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc, "MASTER_ADDR=") == ["node1"]  # the example starts with comment lines
    command = _lines(proc, "command: ")[0]
    assert "--master_addr node1" in command and command.endswith("launch/train.py --deepspeed_config "
                                                                 "ds_configs/zero2_ldb.json --model resnet50")


def test_blank_lines_indented_comments_and_comment_only_hostfiles(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("\n   \n  # a comment with leading spaces\n\tgpu-a slots=4\ngpu-b slots=4\n")
    assert _lines(_dry_run(tmp_path, hostfile), "MASTER_ADDR=") == ["gpu-a"]
    assert _lines(_dry_run(tmp_path, hostfile, MASTER_ADDR="10.0.0.7"), "MASTER_ADDR=") == ["10.0.0.7"]
    hostfile.write_text("# nothing here\n\n")
    proc = _dry_run(tmp_path, hostfile)
    assert proc.returncode == 2 and "lists no host" in proc.stderr


def test_users_deepspeed_env_is_kept_and_wins(tmp_path):
    proc = _dry_run(tmp_path, os.path.join(tu.REPO, "launch", "hostfile.example"),
                    home_env="OMP_NUM_THREADS=8\nNCCL_IB_DISABLE=1\n", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    env = _lines(proc, "env: ")
    # Ours first, the user's after: DeepSpeed keeps the last value, so the user's 8 threads win.
    assert env == ["OMP_NUM_THREADS=1", "DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=8", "NCCL_IB_DISABLE=1"]
    env_file = _lines(proc, "DS_ENV_FILE=")[0]
    assert os.path.isabs(env_file) and not os.path.exists(env_file)  # a temporary file, removed after
    assert (tmp_path / "home" / ".deepspeed_env").read_text() == "OMP_NUM_THREADS=8\nNCCL_IB_DISABLE=1\n"
    assert not os.path.exists(os.path.join(tu.REPO, ".deepspeed_env"))  # nothing written to the checkout
