"""The test suite's time against an earlier commit's, fresh clones side by side (the baseline: 79e3838, where the
Light issue measured it):

- `make test` in a fresh clone of each (venv, install from the package index, lint, both tiers), in turn;
- then the fast tier alone (`pytest -m "not slow"`) in each clone, `--runs` times, in turn.

    python -m benchmarks.test_time [--baseline 79e3838] [--runs 3]

Prints every time, then `make test ours/baseline = X`, `fast tier ours/baseline = Y` (medians), and our
`make test = S s` and `fast tier = F s`. Both clones come from this repository's history (ours: its HEAD); pip's
cache is shared, so both installs find the same packages. Ctrl-C reaches both suites as in a terminal, also when
this script runs in the background (their signal tests send it).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAST_TIER = [".venv/bin/python", "-m", "pytest", "-m", "not slow", "-p", "no:cacheprovider"]


def timed(command: list[str], clone: Path) -> float:
    """Wall seconds of `command` in `clone`; a failure stops the benchmark with its output."""
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed in {clone} (exit {result.returncode}):\n{result.stdout[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="79e3838", help="the commit to compare with")
    parser.add_argument("--runs", type=int, default=3, help="fast-tier runs per clone (the median is used)")
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    revisions = {"baseline": args.baseline, "ours": head.stdout.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        clones = {}
        for who, revision in revisions.items():
            clones[who] = Path(tmp) / who
            subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(clones[who])], check=True)
            subprocess.run(["git", "checkout", "-q", revision], cwd=clones[who], check=True)
        make = {}
        for who, clone in clones.items():
            make[who] = timed(["make", "test"], clone)
            print(f"make test {who} ({revisions[who]}): {make[who]:.1f} s", flush=True)
        fast: dict[str, list[float]] = {who: [] for who in clones}
        for i in range(args.runs):
            for who, clone in clones.items():
                fast[who].append(timed(FAST_TIER, clone))
                print(f"round {i + 1} fast tier {who}: {fast[who][-1]:.1f} s", flush=True)
    ours, baseline = (statistics.median(fast[who]) for who in ("ours", "baseline"))
    print(f"make test ours/baseline = {make['ours'] / make['baseline']:.2f}")
    print(f"fast tier ours/baseline = {ours / baseline:.2f}")
    print(f"make test = {make['ours']:.0f} s")
    print(f"fast tier = {ours:.1f} s")


if __name__ == "__main__":
    main()
