"""Secure aggregation at 64–256 MiB per update: seconds per MiB and peak memory, and the limit.

One protocol round (SecAgg, 4 clients, all in one process, as ``benchmarks/secagg.py`` runs it)
per update size, without dropouts and with one client dropping after the key exchange (its masks
are then rebuilt at the server). Each size runs in a fresh process so that its peak RSS (VmHWM)
is its own. fedfm refuses secure aggregation above 64M values (256 MiB of float32:
``fedfm.privacy.packing.MAX_VALUES``); the cost per MiB here says why.

    python benchmarks/secagg_large.py [--mib 64 128 256] [--out benchmarks/results/secagg-large.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _stamp import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, torch
sys.path.insert(0, {bench!r}); sys.path.insert(0, {src!r})
from secagg import measure
torch.set_num_threads(1)
rows = [measure(4, {length}, None, drop, 1) for drop in (0, 1)]
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"rows": rows, "peak_rss_mb": hwm / 1024}}))
"""


def main() -> None:
    from fedfm.privacy.packing import MAX_VALUES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "secagg-large.json")
    args = ap.parse_args()
    sizes = []
    for mib in args.mib:
        length = mib * (1 << 20) // 4  # float32 values of an update this size
        code = CHILD.format(bench=str(ROOT / "benchmarks"), src=str(ROOT / "src"), length=length)
        got = json.loads(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        )
        for row in got["rows"]:
            row["client_s_per_mib"] = row["client_s_per_client"] / mib
            row["server_s_per_mib"] = row["server_s"] / mib
        sizes.append(
            {"mib": mib, "values": length, "peak_rss_mb": round(got["peak_rss_mb"], 1), "rows": got["rows"]}
        )
        print(json.dumps(sizes[-1]), flush=True)
    config = {"clients": 4, "protocol": "SecAgg", "threshold": 0.67, "bits": 42, "mib": args.mib}
    out = {
        **stamp("scale/secure-aggregation-large", config, [4], torch_threads=1),
        "refused_above_values": MAX_VALUES,
        "sizes": sizes,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
