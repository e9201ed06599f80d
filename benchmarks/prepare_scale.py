"""How `bloger prepare --source synthetic` scales: time and peak memory from 10^5 to 10^7 interactions.

    python benchmarks/prepare_scale.py --sizes 1e5,1e6,1e7 [--repeat 3]

Each size runs twice, each time in a fresh process so its peak RSS is its own (os.wait4 gives the
child's rusage): once the generator alone (`generate`, timed inside the child, imports excluded), once
the real CLI (`bloger prepare --source synthetic --set synthetic.*=...`, wall clock). "sql+write" is
what is left after the CLI's start-up (timed on `bloger --version`) and the generator: DuckDB
filtering, re-indexing and the Parquet writes. "cpu s" is the CLI child's user+sys time, steadier
than wall time on a shared machine; --repeat keeps each size's fastest run.
Sizes: users = interactions/10, items = interactions/50, categories of about 200 items.
"x time" is the wall-time ratio to the previous size, "/size" that ratio over the size ratio
(1.0 = linear), "x cpu" the cpu-time ratio, "x RSS" the peak-memory ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USERS_PER, ITEMS_PER, CATEGORY_SIZE = 10, 50, 200


def synthetic_settings(n: int) -> dict[str, int]:
    items = max(n // ITEMS_PER, 40)
    return {"users": n // USERS_PER, "items": items, "categories": max(items // CATEGORY_SIZE, 20),
            "interactions": n}


def run_child(argv: list[str]) -> tuple[float, float, float, str]:
    """Run a command; returns (wall seconds, user+sys seconds, its own peak RSS in MiB, stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as errs:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=errs, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves: wait4 returns this child's rusage
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        errs.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(argv[:4])} ... failed (exit {proc.returncode}):\n{errs.read()[-3000:]}")
        # ru_maxrss is in KiB on Linux
        return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.read()


def generate_only(n: int) -> None:
    """Child mode: time the generator alone and print JSON."""
    from bloger_cli.config import SyntheticConfig
    from bloger_cli.data.synthetic import generate

    cfg = SyntheticConfig(**synthetic_settings(n))
    t0 = time.perf_counter()
    _, data = generate(cfg)
    print(json.dumps({"seconds": time.perf_counter() - t0, "rows": len(data.users)}))


def bloger() -> str:
    return str(Path(sys.executable).with_name("bloger"))


def startup_seconds() -> float:
    """The CLI's own start-up (interpreter and imports), fastest of three."""
    return min(run_child([bloger(), "--version"])[0] for _ in range(3))


def measure(n: int, workdir: Path, startup: float) -> dict:
    """One size: the generator alone, then the CLI; both in fresh processes."""
    gen_wall, _, gen_rss, out = run_child([sys.executable, __file__, "--generate-only", str(n)])
    argv = [bloger(), "--quiet", "prepare", "--source", "synthetic", "--workspace", str(workdir / f"ws-{n}"),
            "--force", "--json"]
    for key, value in synthetic_settings(n).items():
        argv += ["--set", f"synthetic.{key}={value}"]
    seconds, cpu, rss, result = run_child(argv)
    gen = json.loads(out)["seconds"]
    return {"n": n, "kept": json.loads(result)["result"]["interactions"], "seconds": seconds, "cpu": cpu,
            "gen": gen, "sql": seconds - startup - gen, "rss": rss, "gen_rss": gen_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated interaction counts")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; the fastest is shown")
    parser.add_argument("--workdir", type=Path, default=None, help="where the workspaces go (default: a temp dir)")
    parser.add_argument("--generate-only", type=float, default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.generate_only is not None:
        generate_only(int(args.generate_only))
        return
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    startup = startup_seconds()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bloger-scale-", dir=args.workdir) as tmp:
        for n in sizes:
            print(f"... {n:,} interactions", file=sys.stderr, flush=True)
            runs = [measure(n, Path(tmp), startup) for _ in range(args.repeat)]
            rows.append(min(runs, key=lambda r: r["seconds"]))
    print(f"machine: {os.cpu_count()} cores; CLI start-up {startup:.2f} s (subtracted in sql+write)")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print(f"{'interactions':>13} {'kept':>11} {'wall s':>7} {'cpu s':>7} {'gen s':>6} {'sql+write s':>11} "
          f"{'peak RSS MiB':>12} {'gen RSS MiB':>11} {'s / 1M':>7} {'x time':>7} {'/size':>6} {'x cpu':>6} "
          f"{'x RSS':>6}")
    prev = None
    for r in rows:
        growth = ""
        if prev is not None:
            t, s = r["seconds"] / prev["seconds"], r["n"] / prev["n"]
            growth = f"{t:7.2f} {t / s:6.2f} {r['cpu'] / prev['cpu']:6.2f} {r['rss'] / prev['rss']:6.2f}"
        print(f"{r['n']:>13,} {r['kept']:>11,} {r['seconds']:7.2f} {r['cpu']:7.2f} {r['gen']:6.2f} {r['sql']:11.2f} "
              f"{r['rss']:12.0f} {r['gen_rss']:11.0f} {r['seconds'] / r['n'] * 1e6:7.2f} {growth}")
        prev = r


if __name__ == "__main__":
    main()
