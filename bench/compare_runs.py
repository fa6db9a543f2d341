"""Two `fastrelu bench --json` reports side by side: every cost-over-ReLU ratio and every speed-up,
with how far the second run is from the first, against the agreement the report aims at (10% from
10^5 elements up, 15% below).

    python bench/compare_runs.py RUN1.json RUN2.json > comparison.md
"""
import json
import sys


def human_size(n):
    return f"1e{len(str(n)) - 1}" if str(n).strip("0") == "1" else f"{n:,}"


def figures(report):
    """{(kind, op, direction, elements): ratio summary} of one report: cost over ReLU, and each
    speed-up (a peer's time over fastrelu's)."""
    out = {}
    for row in report["rows"]:
        for name, summary in row["ratios"].items():
            if name in ("copy", "alloc"):
                continue
            kind = "cost over relu" if name == "relu" else f"speed-up over {name}"
            out[(kind, row["op"], row["direction"], row["elements"])] = summary
    return out


def target(elements):
    return 0.10 if elements >= 10**5 else 0.15


def compare(first, second):
    a, b = figures(first), figures(second)
    lines = ["| figure | op | dir | elements | run 1 | run 2 | run 2 / run 1 | within |",
             "|---|---|---|---|---|---|---|---|"]
    tally = {}
    for key in sorted(a, key=lambda k: (k[0] != "cost over relu", k[0], k[3], k[1], k[2])):
        if key not in b:
            continue
        kind, op, direction, n = key
        x, y = a[key], b[key]
        change = y["ratio"] / x["ratio"]
        ok = abs(change - 1) <= target(n)
        group = (kind == "cost over relu", n >= 10**5)
        hits, total = tally.get(group, (0, 0))
        tally[group] = (hits + ok, total + 1)
        lines.append(f"| {kind} | {op} | {direction} | {human_size(n)} | "
                     f"{x['ratio']:.2f} [{x['q1']:.2f}–{x['q3']:.2f}] | "
                     f"{y['ratio']:.2f} [{y['q1']:.2f}–{y['q3']:.2f}] | {change:.2f} | "
                     f"{'yes' if ok else 'no'} |")
    summary = []
    for (is_cost, large), (hits, total) in sorted(tally.items(), reverse=True):
        what = "cost-over-ReLU ratios" if is_cost else "speed-ups"
        where = "from 10^5 elements up (within 10%)" if large else "below 10^5 (within 15%)"
        summary.append(f"- {what} {where}: {hits} of {total} agree")
    return "\n".join(summary + [""] + lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f1, open(sys.argv[2]) as f2:
        print(compare(json.load(f1), json.load(f2)))
