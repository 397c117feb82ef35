"""Mutation testing: does the test suite catch a wrong kernel?

Applies, one at a time, each mutation of `scripts/mutations.py` (a deliberate bug in the CPU
kernels, the Triton kernels, the autograd or the reference) to a copy of the source tree, rebuilds
the CPU-only extension when a C++ file changed, runs the tests with `-x` and records whether the
suite failed (the mutant is *killed*) or passed (it *survived*). Target: no survivor.

    python scripts/mutate.py                 # every mutation; the report goes to stdout
    python scripts/mutate.py --out docs/mutations.txt
    python scripts/mutate.py --only cpu-merge-max-tie triton-lane-tie
    python scripts/mutate.py --list

It is too slow for CI (a rebuild of one CPU unit and a test run per mutation: about an hour on
two cores). The copy lives in a temporary folder: the checkout and its build are not touched. The
Python is .venv/bin/python, or $PYTHON. The tests run as in CI without a GPU: TRITON_INTERPRET=1,
CPU-only build (GAPKERNELS_NO_CUDA=1).

A mutation whose text is not found exactly once in its file is an error (the list has gone stale
against the code), not a pass: the script exits 2 without running anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import DEFAULT_TESTS, MUTATIONS, Mutation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def python() -> str:
    env = os.environ.get("PYTHON")
    if env:
        return env
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def copy_tree(dest: Path) -> None:
    """Tracked files and untracked files git does not ignore (as scripts/coverage.sh does). Into
    a reused work folder (--work), only the files whose content differs are copied, stamped now,
    so that ninja rebuilds exactly what changed (a mutant left by a killed run included)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            target = dest / name.decode()
            if target.is_file():
                if target.read_bytes() != src.read_bytes():
                    shutil.copyfile(src, target)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


SNAPSHOT = ".mutate-snapshot"


def built_files(work: Path) -> list[Path]:
    """What a build writes: build/ (objects, ninja's logs) and the in-place libraries."""
    return [work / "build", *sorted((work / "gapkernels").glob("*.so"))]


def save_build(work: Path) -> None:
    """Keeps the unmutated build (with its timestamps), to be put back after each C++ mutation:
    the next mutation then rebuilds only the units its own file touches, not also the units the
    previous one did (restoring the source would make ninja rebuild them)."""
    snap = work / SNAPSHOT
    shutil.rmtree(snap, ignore_errors=True)
    for src in built_files(work):
        target = snap / src.relative_to(work)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, symlinks=True)
        else:
            shutil.copy2(src, target)


def restore_build(work: Path) -> None:
    snap = work / SNAPSHOT
    for dest in built_files(work):
        if dest.is_dir():
            shutil.rmtree(dest)
        else:
            dest.unlink()
    for src in [snap / "build", *sorted((snap / "gapkernels").glob("*.so"))]:
        target = work / src.relative_to(snap)
        if src.is_dir():
            shutil.copytree(src, target, symlinks=True)
        else:
            shutil.copy2(src, target)


def check_applicable(work: Path, mutations: list[Mutation]) -> list[str]:
    problems = []
    for m in mutations:
        path = work / m.file
        if not path.exists():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: its text occurs {count} times in {m.file} (want 1)")
    return problems


def cpu_variant() -> str:
    """The CPU kernel variant this machine loads (gapkernels/_ext.py's choice: torch's CPU
    capability, or GAPKERNELS_CPU_CAPABILITY): the only one mutate.py builds and tests."""
    forced = os.environ.get("GAPKERNELS_CPU_CAPABILITY", "").strip().lower()
    if forced:
        return forced
    capability = subprocess.run(
        [python(), "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {"AVX2": "avx2", "AVX512": "avx512"}.get(capability, "default")


# Set once in main(): the build makes this variant only, and the tests load it (forced, so that a
# mismatch is an error at import rather than a silently different library).
VARIANT = "default"


def build(work: Path, log: Path) -> bool:
    env = dict(os.environ, GAPKERNELS_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env["GAPKERNELS_CPU_VARIANTS"] = VARIANT
    env["PATH"] = f"{Path(python()).parent}:{env['PATH']}"
    with log.open("a") as f:
        result = subprocess.run(
            [python(), "setup.py", "build_ext", "--inplace"], cwd=work, env=env, stdout=f, stderr=f
        )
    return result.returncode == 0


def run_tests(work: Path, tests: tuple[str, ...], log: Path, timeout: float) -> tuple[int, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", GAPKERNELS_NO_CUDA="1", PYTHONPATH=str(work))
    env["GAPKERNELS_CPU_CAPABILITY"] = VARIANT
    cmd = [python(), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(
            cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    with log.open("a") as f:
        f.write(result.stdout[-20000:] + result.stderr[-5000:])
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return result.returncode, (failed[0] if failed else (lines[-1] if lines else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these mutations (by name)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument(
        "--check", action="store_true", help="only check that every mutation applies, and exit"
    )
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (for debugging)")
    ap.add_argument("--timeout", type=float, default=1800, help="per test run, seconds")
    ap.add_argument(
        "--work",
        type=Path,
        help="use (and keep) this work folder: a later run reuses its build (only what changed "
        "is rebuilt)",
    )
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the test run of the unmutated tree (reruns; the build is still checked)",
    )
    args = ap.parse_args()

    global VARIANT
    mutations = list(MUTATIONS)
    if args.only:
        unknown = set(args.only) - {m.name for m in mutations}
        if unknown:
            ap.error(f"unknown mutations: {sorted(unknown)}")
        mutations = [m for m in mutations if m.name in args.only]
    if args.list:
        for m in mutations:
            print(f"{m.name:34} {m.file}: {m.why}")
        return 0

    if args.work:
        work = args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
        args.keep = True
    else:
        work = Path(tempfile.mkdtemp(prefix="gapkernels-mutate."))
    log = work / "mutate.log"
    report: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)
        if args.out:  # as it goes: an interrupted run leaves its partial report
            args.out.write_text("\n".join(report) + "\n")

    try:
        copy_tree(work)
        problems = check_applicable(work, mutations)
        if problems:
            for p in problems:
                print(f"mutate.py: stale mutation: {p}", file=sys.stderr)
            return 2
        if args.check:
            print(f"mutate.py: all {len(mutations)} mutations apply")
            return 0
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet"], cwd=ROOT).returncode != 0
        say(
            f"gapkernels mutation run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"commit {commit}{' + local changes' if dirty else ''}, {len(mutations)} mutations"
        )
        start = time.time()
        VARIANT = cpu_variant()
        say(f"CPU variant built and tested: {VARIANT} (GAPKERNELS_CPU_VARIANTS={VARIANT})")
        if not build(work, log):
            print(f"mutate.py: the unmutated build failed; see {log}", file=sys.stderr)
            args.keep = True
            return 3
        save_build(work)
        if args.no_baseline:
            say(f"unmutated: built ({time.time() - start:.0f} s); tests not run (--no-baseline)")
        else:
            status, summary = run_tests(work, DEFAULT_TESTS, log, args.timeout)
            if status != 0:
                print(f"mutate.py: unmutated tests fail ({summary}); see {log}", file=sys.stderr)
                args.keep = True
                return 3
            say(f"unmutated: {summary} ({time.time() - start:.0f} s incl. the build)")
        say("")
        say(f"| {'mutation':34} | result   | build | time  | first failing test |")
        say(f"| {'-' * 34} | -------- | ----- | ----- | ------------------ |")
        survivors = []
        skipped = []
        for m in mutations:
            t0 = time.time()
            if m.variants and VARIANT not in m.variants:
                skipped.append(m.name)
                needs = " or ".join(m.variants)
                say(f"| {m.name:34} | skipped  |    0s |    0s | needs the {needs} variant |")
                continue
            path = work / m.file
            original = path.read_text()
            stamp = path.stat()
            path.write_text(original.replace(m.old, m.new, 1))
            cpp = m.file.startswith("csrc/")
            built = 0.0
            try:
                ok = True
                if cpp:
                    ok = build(work, log)
                    built = time.time() - t0
                if not ok:
                    result, summary = "NO-BUILD", "the mutant did not compile (fix the mutation)"
                else:
                    status, summary = run_tests(work, m.tests or DEFAULT_TESTS, log, args.timeout)
                    result = {0: "SURVIVED", 1: "killed"}.get(status, f"error {status}")
            finally:
                # The source with its old timestamp, and the unmutated build's files with theirs:
                # ninja sees nothing to rebuild until the next mutation touches a file.
                path.write_text(original)
                os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
                if cpp:
                    restore_build(work)
            if result != "killed":
                survivors.append(m.name)
            say(
                f"| {m.name:34} | {result:8} | {built:4.0f}s | {time.time() - t0:4.0f}s "
                f"| {summary[:110]} |"
            )
        say("")
        ran = len(mutations) - len(skipped)
        say(
            f"{ran - len(survivors)} of {ran} killed; "
            f"survivors: {', '.join(survivors) or 'none'}; "
            f"skipped (another CPU variant): {', '.join(skipped) or 'none'}; "
            f"{time.time() - start:.0f} s in all"
        )
        return 1 if survivors else 0
    finally:
        if args.keep:
            print(f"mutate.py: work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
