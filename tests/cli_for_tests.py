"""Run the command line as a user does, through ``memprof.cli.main`` (where exit codes are decided)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

from memprof.cli import main


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def invoke(*args: str) -> Result:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    return Result(code, stdout.getvalue(), stderr.getvalue())
