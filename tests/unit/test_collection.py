"""The suite collects every test file: `scripts/test.sh` runs `pytest tests`, and a directory that
pytest skips (its default norecursedirs holds "dist", "build", ...) would silently drop its tests."""

import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parents[1]


def test_pytest_tests_collects_every_test_file():
    on_disk = {str(p.relative_to(TESTS.parent)) for p in TESTS.rglob("test_*.py")}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                         cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}
    # A file skipped as a whole (its optional dependency missing, e.g. the hf extra) was still
    # entered: pytest reports it as "SKIPPED [1] tests/...py: reason".
    collected |= {line.split("] ", 1)[1].split(":")[0] for line in out.stdout.splitlines()
                  if line.startswith("SKIPPED [")}
    assert on_disk - collected == set(), f"test files pytest does not collect: {sorted(on_disk - collected)}"
