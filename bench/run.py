"""``python -m bench``: start the fakes, the bare relay and the proxy, run the scenarios, print.

Prints a table per scenario (medians of the repeats; a column per target, then proxy ÷ relay
and proxy − direct or proxy ÷ direct) and the issue's targets with the measured figure beside
each. ``--json`` prints everything (raw repeats included) as one JSON object instead.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import signal
import sys
import time
from typing import Any

import orjson

from .harness import Bench, Pinning
from .scenarios import QUICK, SCENARIOS, SMOKE, Settings, local_ocr_start


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs {model}".strip()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        for key in r:
            if key not in columns and key not in ("metric", "unit"):
                columns.append(key)
    header = ["metric", "unit", *columns]
    cells = [[_fmt(r.get(c, "")) for c in header] for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append(
            "  ".join(
                (v.ljust(w) if i < 2 else v.rjust(w))
                for i, (v, w) in enumerate(zip(c, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _chosen(name: str, wanted: str) -> bool:
    """Whether ``--only``'s ``wanted`` names scenario ``name``: its number ("1" is not "10"),
    or the start or end of its name."""
    if wanted.isdigit():
        return name.split("-", 1)[0] == wanted
    return name.startswith(wanted) or name.endswith(wanted)


def run(settings: Settings, only: list[str] | None, log: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "python": platform.python_version(),
        "settings": settings.__dict__,
        "scenarios": {},
    }
    chosen = {
        name: scenario
        for name, scenario in SCENARIOS.items()
        if not only or any(_chosen(name, o) for o in only)
    }
    with Bench(
        ocr_delay=settings.ocr_delay,
        pinning=Pinning.shared() if settings.lean else Pinning.detect(),
        lean=settings.lean,
    ) as bench:
        if settings.lean and "7-local-ocr" in chosen:
            local_ocr_start(bench, settings)  # its own CPU-bound process: alongside the others
        report["pinning"] = bench.pinning.describe()
        report["load_generator"] = "wrk " + (shutil.which("wrk") or "missing")
        log(f"# ocrproxy bench, {report['date']}, {report['machine']}")
        log(f"# {report['pinning']}; medians of {settings.repeats} repeats")
        for name, scenario in chosen.items():
            started = time.monotonic()
            result = scenario(bench, settings)
            result["seconds"] = round(time.monotonic() - started, 1)
            report["scenarios"][name] = result
            log(f"\n## {name}  ({result['seconds']} s, errors: {result['raw']['errors']})")
            log(table(result["rows"]))
        # all stopped when this block ends
        report["pids"] = [p.pid for p in bench.procs] + bench.retired
    return report


def targets_table(report: dict[str, Any]) -> str:
    rows = []
    for name, result in report["scenarios"].items():
        for t in result["targets"]:
            met = {True: "yes", False: "NO", None: "-"}[t["met"]]
            rows.append(
                {
                    "metric": f"{name.split('-', 1)[0]}: {t['target']}",
                    "unit": t["unit"].strip(),
                    "measured": t["measured"],
                    "met": met,
                }
            )
    return table(rows)


def _stop_on(signum: int, _frame: object) -> None:
    # An exception, so that ``Bench`` stops every child on its way out (and subprocess.run the
    # driver it waits for); a second signal meanwhile is blocked by ``Bench.stop``.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~1-minute run (shorter phases)")
    parser.add_argument("--smoke", action="store_true", help="seconds; checks the harness only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", nargs="*", help="scenario names or numbers, e.g. 1 4")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else QUICK if args.quick else Settings()

    def log(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    signal.signal(signal.SIGTERM, _stop_on)
    signal.signal(signal.SIGHUP, _stop_on)
    report = run(settings, args.only, log)
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        log("\n## targets")
        log(targets_table(report))
    return 0
