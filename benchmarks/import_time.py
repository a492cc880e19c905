"""How long `fedfm --help` takes to start, this checkout against another source tree, side by side.

Each repeat runs `python -m fedfm.cli --help` once per tree, alternating, so machine noise hits
both; reported as medians and minimums of wall time, and of `-X importtime`'s cumulative time for
`import fedfm.cli`. The other tree is any checkout's `src` folder (for the components issue: a
`git worktree` of the commit before the regrouping). Usage:

    git worktree add /tmp/before 135e378
    python benchmarks/import_time.py --before /tmp/before/src [--repeats 8] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"


def _env(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src)}


def help_seconds(src: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fedfm.cli", "--help"], env=_env(src), check=True, capture_output=True
    )
    return time.perf_counter() - start


def import_seconds(src: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import fedfm.cli"],
        env=_env(src), check=True, capture_output=True, text=True,
    )  # fmt: skip
    last = [line for line in out.stderr.splitlines() if line.rstrip().endswith("fedfm.cli")][-1]
    return int(last.split("|")[1]) / 1e6


def summary(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "runs_s": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other tree's src folder")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/import_time.json"))
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE}
    helps, imports = {k: [] for k in trees}, {k: [] for k in trees}
    for _ in range(args.repeats):
        for name, src in trees.items():
            helps[name].append(help_seconds(src))
            imports[name].append(import_seconds(src))
    result = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "method": "the two trees alternated in one loop; wall time of `fedfm --help`, and -X importtime's "
        "cumulative time of `import fedfm.cli`",
        "repeats": args.repeats,
        "trees": {k: str(v) for k, v in trees.items()},
        "help": {k: summary(v) for k, v in helps.items()},
        "import": {k: summary(v) for k, v in imports.items()},
        "help_median_ratio_after_over_before": statistics.median(helps["after"])
        / statistics.median(helps["before"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("help_median_ratio_after_over_before",)}))


if __name__ == "__main__":
    main()
