"""Record the CPU in a results file written before results files recorded it, on the
machine that measured it.

The same seed and commit compute different numbers on CPUs of different instruction
sets (docs/benchmarks.md), so a table's stamp names its CPU (``provenance.cpu_text``).
A results file written by a checkout older than 5cdf2f8 (the evidence commit 6b2f659
is one) has no ``cpu`` / ``cpu_isa`` in its ``machine``. Run in the session that
measured it, this script reads them from ``/proc/cpuinfo`` and adds them, after checking
that the file was measured here:

* every run of the file started after this machine booted (a file of an earlier boot,
  or one carried from another machine of an earlier session, is refused);
* the file's cores, platform, python and package versions are this machine's.

These guard against the usual mistake, a later session on another machine; they cannot
tell a file copied in from a machine of the same kernel and packages, measured since
this one booted.

What was checked is kept beside the CPU, as ``machine.cpu_stamped`` (when, the boot
time, the command). The ``.md`` beside the json gets the new stamp line; nothing else
in either file changes. A file that already records a CPU is left as it is (a different
CPU is refused).

    python benchmarks/stamp_cpu.py benchmarks/results/pending/embeddings_6b2f659_seed0.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

SAME = (*provenance.SAME_MACHINE, "platform")


def boot_time(uptime: Path = Path("/proc/uptime")) -> dt.datetime:
    """When this machine booted (UTC), from ``/proc/uptime``."""
    seconds = float(uptime.read_text().split()[0])
    return dt.datetime.fromtimestamp(time.time() - seconds, dt.timezone.utc)


def problems(prov: dict, here: dict, booted: dt.datetime) -> list[str]:
    """Why ``prov`` cannot be stamped with the CPU of machine ``here`` booted at ``booted``."""
    found = []
    for run in prov.get("runs") or []:
        started = run.get("started")
        if started is None or dt.datetime.fromisoformat(started) <= booted:
            found.append(f"run {run.get('label')} (seed {run.get('seed')}) started {started}, "
                         f"not after this machine booted ({booted.isoformat(timespec='seconds')})")  # fmt: skip
    if not prov.get("runs"):
        found.append("it records no runs")
    machine = prov.get("machine") or {}
    found += [f"machine {k}: {machine.get(k)!r} in the file, {here.get(k)!r} here"
              for k in SAME if machine.get(k) != here.get(k)]  # fmt: skip
    return found


def stamp_cpu(path: Path, here: dict, booted: dt.datetime, command: str) -> str:
    """Add ``here``'s CPU to the results file ``path`` (and its md's stamp line); returns
    what was done. Raises ``SystemExit`` naming the file when it was not measured here."""
    results, prov = provenance.load(path)
    if prov is None:
        raise SystemExit(f"{path}: no provenance (a legacy file): nothing to stamp")
    machine = prov.setdefault("machine", {})
    if machine.get("cpu_isa") is not None:
        if (machine.get("cpu"), machine["cpu_isa"]) != (here["cpu"], here["cpu_isa"]):
            raise SystemExit(f"{path}: records {provenance.cpu_name(machine)}, "
                             f"this machine is {provenance.cpu_name(here)}")  # fmt: skip
        return f"{path}: already records {provenance.cpu_name(machine)}"
    md = path.with_suffix(".md")
    if not md.is_file():
        raise SystemExit(f"{path}: no {md.name} beside it (provenance.write writes both): "
                         "its stamp line cannot be rewritten")  # fmt: skip
    found = problems(prov, here, booted)
    if found:
        raise SystemExit(f"{path} was not measured on this boot of this machine:\n- "
                         + "\n- ".join(found))  # fmt: skip
    machine.update(cpu=here["cpu"], cpu_isa=here["cpu_isa"])
    machine["cpu_stamped"] = {"at": provenance.now(), "booted": booted.isoformat(timespec="seconds"),
                              "command": command}  # fmt: skip
    # the new stamp line, then the table as written
    provenance.write(path.stem, results, md.read_text().split("\n\n", 1)[1], prov, path.parent)
    return f"{path}: {provenance.cpu_name(machine)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+", help="results json files measured here")
    args = parser.parse_args()
    here, booted = provenance.machine(), boot_time()
    if here.get("cpu_isa") is None:
        raise SystemExit("this machine's CPU cannot be read (/proc/cpuinfo)")
    command = provenance.command_line([sys.executable, *sys.argv])
    for path in args.files:
        print(stamp_cpu(path, here, booted, command))


if __name__ == "__main__":
    main()
