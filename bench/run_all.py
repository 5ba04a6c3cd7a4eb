"""Run every benchmark (quick versions with --quick). Each prints its table and writes bench/results/<name>.json."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

BENCHES = [
    "bench.bench_parity",
    "bench.bench_round_cost",
    "bench.bench_consensus",
    "bench.bench_net",  # before model_size, which reads its measured stream throughput
    "bench.bench_model_size",
    "bench.bench_robustness",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short versions (a few minutes in all)")
    args = ap.parse_args()
    failed = []
    for mod in BENCHES:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            print(f"skip {mod}: {exc}")
            continue
        cmd = [sys.executable, "-m", mod] + (["--quick"] if args.quick else [])
        print(f"\n=== {' '.join(cmd[2:])}")
        if subprocess.run(cmd).returncode != 0:
            failed.append(mod)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
