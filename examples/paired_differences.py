"""Paired per-seed differences of fused test accuracy between benchmark rows (one saved benchmark JSON).

    python examples/paired_differences.py docs/results/benchmark_av_digits.json --against baseline cml --methods opm lfm

For each method and reference: the mean over seeds of (method − reference), its 95% t interval and the number of
seeds in which the method is better. Seeds are paired (same data split and initial weights per seed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--against", nargs="+", default=["baseline"])
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--metric", default="acc")
    args = parser.parse_args(argv)
    results = json.load(open(args.file))["results"]
    print("| method | reference | mean difference | 95% CI | seeds better |\n|---|---|---|---|---|")
    for method in args.methods:
        for ref in args.against:
            a = {r["seed"]: r[args.metric] for r in results[method]}
            b = {r["seed"]: r[args.metric] for r in results[ref]}
            diff = [a[s] - b[s] for s in sorted(a) if s in b]
            mean = statistics.mean(diff)
            half = T95.get(len(diff) - 1, 1.96) * statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
            print(f"| {method} | {ref} | {mean:+.3f} | {mean - half:+.3f} to {mean + half:+.3f} | "
                  f"{sum(x > 0 for x in diff)}/{len(diff)} |")


if __name__ == "__main__":
    main()
