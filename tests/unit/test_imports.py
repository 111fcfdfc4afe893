"""The core stays a library: what ``import ldb_ds`` and ``ldb_ds.initialize`` load, and the import rules.

docs/design.md, section 2: the core needs torch and DeepSpeed only; its modules import one way
(pure -> torch -> DeepSpeed) and never import the applications; the applications import the core
and the shared ``ldb_ds.workloads``, never each other; nothing in ``ldb_ds`` imports in a circle.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORE = ROOT / "ldb_ds"
APP_LIBRARIES = ("matplotlib", "timm", "torchvision", "tensorboard", "sklearn", "yaml", "transformers",
                 "accelerate", "PIL")

# One real rank (gloo), a real ZeRO-2 engine, one FULL and one DROP step; then report which
# application libraries are loaded. The same script with LDB off is plain DeepSpeed: what it loads
# is what DeepSpeed itself needs, which the core may load too.
_PROBE = r"""
import json, sys
import torch
from torch import nn
import ldb_ds
from ldb_ds.process import init_process, teardown

after_import = sorted(m for m in sys.modules if m.split(".")[0] in APPS)
init_process(threads=1, backend="gloo")
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, "zero_optimization": {"stage": 2},
       "zero_allow_untested_optimizer": True, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
       "layer_drop_back": {"enabled": ENABLED, "keep_first": 1, "keep_last": 1, "drop_rate": 0.5, "sampling_rate": 1}}
engine, _, _, _ = ldb_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
modes = []
for epoch in (0, 1):
    engine.set_epoch(epoch)
    x = torch.randn(engine.micro_batch_size, 8)
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    modes.append(engine.ldb.mode.value)
teardown(engine)
loaded = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in APPS})
print("PROBE" + json.dumps({"after_import": after_import, "loaded": loaded, "modes": modes,
                            "steps": engine.ldb.steps}))
"""


def _probe(enabled: bool) -> dict:
    code = _PROBE.replace("APPS", repr(APP_LIBRARIES)).replace("ENABLED", repr(enabled))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


@pytest.mark.slow
def test_import_and_initialize_load_no_application_library():
    plain = _probe(enabled=False)
    ldb = _probe(enabled=True)
    assert ldb["modes"] == ["FULL", "DROP"] and ldb["steps"] == 2  # it really trained, LDB on
    assert ldb["after_import"] == [], f"import ldb_ds loaded {ldb['after_import']}"
    extra = sorted(set(ldb["loaded"]) - set(plain["loaded"]))
    assert extra == [], f"ldb_ds.initialize loaded application libraries DeepSpeed does not: {extra}"


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved inside ldb_ds)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


CORE_LAYERS = {
    "config": "pure", "schedule": "pure",
    "units": "torch", "functional": "torch", "controller": "torch", "kept_gradient": "torch", "sampler": "torch",
    "checkpointing": "torch", "checkpoint_fit": "torch", "state_file": "torch", "initialize_args": "torch",
    "refusals": "deepspeed", "setup": "deepspeed", "zero_hooks": "deepspeed", "installation": "deepspeed",
    "attach": "deepspeed",
    "engine": "deepspeed",
    "process": "deepspeed", "runtime_checks": "deepspeed", "__init__": "pure",
    # Deprecated names (one release): each re-exports its new module, so it sits in that module's layer.
    "guards": "deepspeed", "safety": "deepspeed", "runtime": "deepspeed",
}
# Core packages (a directory with __init__.py): every file in them is held to the package's layer.
CORE_PACKAGES = {"zero_hooks"}
APPLICATIONS = {"train", "bench", "integrations"}
# What ldb-train and ldb-bench share (datasets, models, evaluation): beside the core, not in it.
SHARED = "workloads"
# Which of the non-core packages each one may import (besides the core): the two applications
# share ``workloads`` and never import each other; ``workloads`` and the integrations import the
# core only.
MAY_IMPORT = {"train": {SHARED}, "bench": {SHARED}, "integrations": set(), SHARED: set()}
# ldb_ds.zero_hooks is a package; these are its modules (docs/design.md, section 2).
ZERO_HOOKS_MODULES = {"__init__", "version", "groups", "step_filter", "step_paths", "norms", "views", "patches", "zero0_step",
                      "zero12_step", "zero3_step", "step_loops", "accumulation"}


def _files_of(module: str) -> list[pathlib.Path]:
    if module in CORE_PACKAGES:
        return sorted((CORE / module).glob("*.py"))
    return [CORE / f"{module}.py"]


@pytest.mark.parametrize("module", sorted(CORE_LAYERS))
def test_core_imports_flow_one_way(module):
    imported = set().union(*(_imports(f) for f in _files_of(module)))
    roots = {n.split(".")[0] for n in imported}
    layer = CORE_LAYERS[module]
    if layer == "pure":
        assert not roots & {"torch", "deepspeed", "numpy"}, f"ldb_ds.{module} must stay pure Python"
    if layer in ("pure", "torch"):
        assert "deepspeed" not in roots, f"ldb_ds.{module} must not import DeepSpeed"
    apps = [n for n in imported if n.split(".")[:2] in (["ldb_ds", p] for p in MAY_IMPORT)]
    assert not apps, f"the core module ldb_ds.{module} imports an application: {apps}"
    rank = {"pure": 0, "torch": 1, "deepspeed": 2}
    for name in imported:
        parts = name.split(".")
        if parts[0] == "ldb_ds" and len(parts) > 1 and parts[1] in CORE_LAYERS:
            assert rank[CORE_LAYERS[parts[1]]] <= rank[layer], f"ldb_ds.{module} ({layer}) imports {name}"


def test_every_core_module_is_classified():
    on_disk = {p.stem for p in CORE.glob("*.py")}
    packages = {p.parent.name for p in CORE.glob("*/__init__.py")} - APPLICATIONS - {SHARED}
    assert packages == CORE_PACKAGES, "classify new core packages in CORE_PACKAGES (and docs/design.md, section 2)"
    assert on_disk | packages == set(CORE_LAYERS), \
        "add new core modules to CORE_LAYERS (and to docs/design.md, section 2)"
    in_zero_hooks = {p.stem for p in (CORE / "zero_hooks").glob("*.py")}
    assert in_zero_hooks == ZERO_HOOKS_MODULES, "list new zero_hooks modules (and in docs/design.md, section 2)"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


_MODULES = {_module_name(p): p for p in CORE.rglob("*.py")}


def _imported_modules(path: pathlib.Path) -> set[str]:
    """The ldb_ds modules a file imports, at module level or inside functions.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module (``from . import
    checkpoint``), else ``pkg``; relative imports are resolved; names outside ldb_ds are left out.
    """
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in _MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in _MODULES:
                    found.add(f"{source}.{alias.name}")
                elif source in _MODULES:
                    found.add(source)
    return found - {this}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_applications_do_not_import_each_other(package):
    # ldb-bench used to import ldb-train's data, models and monitor: a change inside the training
    # app could break the benchmark. What both need lives in ldb_ds.workloads.
    others = set(MAY_IMPORT) - MAY_IMPORT[package] - {package}
    wrong = sorted(f"{f.relative_to(ROOT)} imports {name}" for f in (CORE / package).rglob("*.py")
                   for name in _imported_modules(f) if name.split(".")[1:2] and name.split(".")[1] in others)
    assert not wrong, f"ldb_ds.{package} may import the core and {sorted(MAY_IMPORT[package])} only: {wrong}"


def _import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycles_in_the_package():
    # A cycle (train.loop <-> train.monitor once) means neither module can be read, tested or
    # moved alone; a function-level import only hides it from Python, so it counts too.
    graph = {name: _imported_modules(path) for name, path in _MODULES.items()}
    assert _import_cycles(graph) == []
    assert _import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # it finds one


def test_moved_names_keep_a_deprecated_alias():
    # ldb_ds.train.data's datasets and ldb_ds.train.models moved to ldb_ds.workloads (issue 17):
    # the old names still work for one release, with a warning that names the new home.
    from ldb_ds.train import data as old_data, models as old_models
    from ldb_ds.workloads import data, models

    with pytest.warns(DeprecationWarning, match="ldb_ds.workloads.data.build_datasets"):
        assert old_data.build_datasets is data.build_datasets
    with pytest.warns(DeprecationWarning, match="ldb_ds.workloads.models.create_model"):
        from ldb_ds.train.models import create_model
    assert create_model is models.create_model
    with pytest.raises(AttributeError):
        old_models.no_such_name  # noqa: B018


def test_zero_hooks_keeps_its_public_names():
    # The rest of ldb_ds, the bench and the tests use zero_hooks.X and ``from ldb_ds.zero_hooks import X``.
    from ldb_ds import zero_hooks

    for name in zero_hooks.__all__:
        assert hasattr(zero_hooks, name), name
    assert {"basic_optimizer", "check_group_order", "install_group_step_filter", "install_allgather_skip",
            "install_batched_grad_norm", "refuse_unverified_step_paths", "clear_stale_gradient_partitions",
            "NOT_A_GRADIENT", "VERIFIED_DEEPSPEED", "install_step_loops"} <= set(zero_hooks.__all__)


def test_deepspeed_internals_stay_in_zero_hooks():
    # Private DeepSpeed modules (deepspeed.runtime.*) are imported by zero_hooks only; refusals and
    # the engine use DeepSpeed's public API and config keys.
    for module in sorted(CORE_LAYERS):
        if module == "zero_hooks":
            continue
        for f in _files_of(module):
            private = sorted(n for n in _imports(f) if n.startswith("deepspeed.runtime"))
            assert not private, f"{f.relative_to(ROOT)} imports DeepSpeed internals {private}: move them to zero_hooks"


# Being split into one module per job (issue 7); this set must end empty.
PENDING_SPLIT: set[str] = set()


def test_no_file_in_the_package_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in CORE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500 and str(p.relative_to(ROOT)) not in PENDING_SPLIT}
    assert not long, f"split these modules: {long}"


def test_console_scripts_and_module_entry_points_resolve():
    # pyproject's [project.scripts] name a module and a function: a renamed module must take them along.
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"ldb-train", "ldb-bench"}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), f"{name} = {target!r}"
    for app in ("train", "bench"):  # python -m ldb_ds.train / ldb_ds.bench run the same function
        main = _imported_modules(CORE / app / "__main__.py")
        assert main & {scripts[f"ldb-{app}"].partition(":")[0]}, f"ldb_ds/{app}/__main__.py imports {main}"


def test_declared_core_dependencies_are_torch_and_deepspeed_only():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0] for r in project["dependencies"])
    assert names == ["deepspeed", "torch"]
    torch_req = next(r for r in project["dependencies"] if r.startswith("torch"))
    assert "==" not in torch_req, "torch is a floor, not a pin: users keep their own CUDA build"
