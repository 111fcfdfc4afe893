"""``ldb-bench`` / ``python -m ldb_ds.bench``: parse the options, run the modes, write the results.

::

    python -m ldb_ds.bench step,epochs --model resnet18 --zero-stage 2 --out bench_results
    deepspeed --num_gpus 2 --module ldb_ds.bench step,epochs ...          # world size 2
    python -m ldb_ds.bench scaling --world-sizes 1,2 ...                  # launches the above
    python -m ldb_ds.bench report bench_results                            # re-render md/png/tb

Modes (comma-separated modes share one process and one process group): ``step``
(:mod:`.step`), ``epochs``, ``sweep-drop-rate``, ``sweep-sampling-rate`` (:mod:`.epochs`),
``accuracy`` (:mod:`.accuracy`), ``counts`` (:mod:`.counts`), ``host`` (:mod:`.host`),
``scaling`` (:mod:`.scaling`) and ``report`` (re-renders Markdown, PNG and TensorBoard files
from the JSON files in a directory).

Timing rules (docs/benchmark.md): wall clock (``time.perf_counter``) with the accelerator
synchronised around every timed region, warm-up excluded, baseline and LDB alternated in one
process on the same data, medians with quartiles and min/max, and the conditions (machine,
device, world size, model, batch size, precision) written with every table.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from . import report as rep
from .bench_arguments import parse
from .bench_options import BenchOptions, report_error
from .harness import BenchContext


def _runners() -> dict[str, Callable[[BenchContext], dict[str, Any]]]:
    from .accuracy import run_accuracy
    from .counts import run_counts
    from .epochs import run_epochs, run_sweep
    from .host import run_host
    from .project import run_project
    from .step import run_step

    return {
        "step": run_step,
        "epochs": run_epochs,
        "sweep-drop-rate": lambda ctx: run_sweep(ctx, "drop_rate"),
        "sweep-sampling-rate": lambda ctx: run_sweep(ctx, "sampling_rate"),
        "accuracy": run_accuracy,
        "counts": run_counts,
        "project": run_project,
        "host": run_host,
    }


def run_report(opts: BenchOptions) -> None:
    """Re-render Markdown, PNG (and TensorBoard) files from every result JSON in the directories."""
    for d in opts.report_dirs or [opts.output.out]:
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if name.endswith(".json") and os.path.isfile(path):
                try:
                    res = rep.read_json(path)
                except (ValueError, OSError) as err:  # another JSON file, or an unreadable one: said, skipped
                    print(f"[bench] skipped {path}: {err}")
                    continue
                paths = rep.write_all(res, d, name[:-5], tensorboard=not opts.output.no_tensorboard)
                print(f"[bench] re-rendered {', '.join(paths.values())}")


def main(argv: Sequence[str] | None = None) -> int:
    from ..process import teardown
    from .harness import setup

    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse(argv)
    out = opts.output
    if opts.modes == ["report"]:
        for d in opts.report_dirs or [out.out]:
            if not os.path.isdir(d):
                return _usage_error(f"report: {d} is not a directory of result JSON files")
        run_report(opts)
        return 0
    # Every rank checks the same path before any process group exists, so all stop alike. The
    # benchmark only ever adds files to --out (it deletes nothing), and refuses a file in its place.
    problem = check_out_dir(out.out)
    if problem:
        return _usage_error(problem)
    if opts.modes == ["scaling"]:
        from .scaling import run_scaling

        res = run_scaling(opts, argv)
        paths = rep.write_all(res, out.out, "scaling", tensorboard=not out.no_tensorboard)
        print(rep.markdown(res))
        print(f"[bench] wrote {', '.join(paths.values())}")
        return 0
    runners = _runners()
    ctx = setup(opts, argv)
    try:
        for mode in opts.modes:
            ctx.log(f"{mode}: start (world size {ctx.world_size}, {ctx.threads} thread(s)/rank)")
            res = runners[mode](ctx)
            if ctx.main:
                paths = rep.write_all(res, out.out, mode, tensorboard=not out.no_tensorboard)
                if not out.quiet:
                    print(rep.markdown(res), flush=True)
                ctx.log(f"wrote {', '.join(paths.values())}")
    finally:
        teardown()
    return 0


def check_out_dir(out: str) -> str:
    """``""`` if ``--out`` is, or can be created as, a writable directory; else the one-line reason."""
    if not out or "\0" in out:
        return f"--out {out!r} is not a usable directory name"
    from ..process import unusable_output_dir

    why, probe = unusable_output_dir(out)
    if why in ("file", "under_file"):
        where = "is an existing file" if why == "file" else f"lies under {probe}, which is a file"
        return f"--out {out} {where}, not a directory; ldb-bench never replaces files: choose a directory"
    if why == "not_writable":
        return f"--out {out}: {probe} is not writable; choose a writable directory"
    return ""


def _usage_error(message: str) -> int:
    """:func:`.bench_options.report_error` (one line, from rank 0), exit status 2."""
    report_error(message)
    return 2


def run() -> None:
    """The ``ldb-bench`` entry point: :func:`main`, then :func:`ldb_ds.process.exit_process` with its code."""
    from ..process import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
