"""One child process per CUDA measurement, so no optimizer's cached blocks, peak counters,
cuBLAS workspace or OOM touch another's. A crashed child becomes a failed record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from memprof import runfile
from memprof.record import RunRecord
from memprof.settings import Settings


def measure_in_child(settings: Settings) -> RunRecord:
    """Run ``memprof.measure.runner.measure`` in a fresh interpreter and read its record back."""
    with tempfile.TemporaryDirectory(prefix="memprof-") as tmp:
        settings_path, record_path = Path(tmp, "settings.json"), Path(tmp, "record.json")
        settings_path.write_text(json.dumps(asdict(settings)))
        proc = subprocess.run(
            [sys.executable, "-m", "memprof.measure.isolation", str(settings_path), str(record_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # The child imports what the parent can (a user's optimizer class by dotted path).
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        if proc.returncode == 0 and record_path.exists():
            return runfile.read(record_path, "child record")[0]
        if proc.returncode == 2 and proc.stderr.strip():
            from memprof.errors import UsageError

            raise UsageError(proc.stderr.strip().splitlines()[-1])
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
        return RunRecord(settings=settings, environment={}, status="failed", failure=f"child crashed: {tail}")


def _main(settings_path: str, record_path: str) -> int:
    from memprof.errors import UsageError
    from memprof.measure.runner import measure

    settings = Settings(**json.loads(Path(settings_path).read_text()))
    try:
        record = measure(settings)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    runfile.write(record_path, [record])
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
