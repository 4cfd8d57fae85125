"""Wall time of every registered strategy's default run (`python -m jaxal.run --strategy S`: the
digits_quick preset, 6 cycles), one child process at a time, with the CPU seconds (user + sys) each
child used: on a shared machine the wall time depends on the other jobs, the CPU seconds much less.

    python experiments/time_default_strategies.py                 # every strategy, the default run
    python experiments/time_default_strategies.py --strategies vaal,sraal --extra --cycles 2

Prints a Markdown table (the README's) and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_strategy(strategy: str, extra: list[str], workdir: str) -> tuple[float, float, int]:
    """(wall seconds, child user+sys seconds, exit status) of one default run of `strategy`."""
    command = [sys.executable, "-m", "jaxal.run", "--strategy", strategy, "--workdir", workdir, "--progress", "false",
               *extra]
    cpu_before, start = child_cpu_seconds(), time.perf_counter()
    status = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - start, child_cpu_seconds() - cpu_before
    if status.returncode:
        print(f"{strategy} failed (exit {status.returncode}):\n{status.stderr[-2000:]}", file=sys.stderr)
    return wall, cpu, status.returncode


def main() -> None:
    from jaxal.strategies import STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for every run")
    args = parser.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"flags: {' '.join(args.extra) or '(defaults)'}", flush=True)
    print("| strategy | wall s | CPU s (user+sys) |\n|---|---:|---:|", flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as root:
        for strategy in strategies:
            wall, cpu, status = time_strategy(strategy, args.extra, os.path.join(root, strategy))
            failed += [strategy] if status else []
            print(f"| {strategy} | {wall:.0f} | {cpu:.0f} |" + (" FAILED" if status else ""), flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
