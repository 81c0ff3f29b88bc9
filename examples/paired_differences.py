"""Paired per-seed differences of fused test accuracy between benchmark rows (one saved benchmark JSON).

    python examples/paired_differences.py docs/results/benchmark_av_digits.json --against baseline cml --methods opm lfm

For each method and reference: the mean over seeds of (method − reference), its 95% t interval and the number of
seeds in which the method is better. Seeds are paired (same data split and initial weights per seed).
"""

from __future__ import annotations

import argparse
import json

from lightning_balance.compare import paired_difference


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
            d = paired_difference(a, b)
            print(f"| {method} | {ref} | {d['mean']:+.3f} | {d['low']:+.3f} to {d['high']:+.3f} | "
                  f"{d['better']}/{d['n']} |")


if __name__ == "__main__":
    main()
