"""What a preflight found: one row per check, the failed ones as one line each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dino_scale.errors import UserError

Status = Literal["ok", "warn", "FAIL", "skip"]


@dataclass
class Check:
    name: str  # what was checked, e.g. "data.train_shards"
    status: Status
    detail: str  # the finding; for FAIL, what is wrong and what to do


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, name: str, status: Status, detail: str) -> Check:
        check = Check(name, status, detail)
        self.checks.append(check)
        return check

    def ok(self, name: str, detail: str) -> Check:
        return self.add(name, "ok", detail)

    def warn(self, name: str, detail: str) -> Check:
        return self.add(name, "warn", detail)

    def fail(self, name: str, detail: str) -> Check:
        return self.add(name, "FAIL", detail)

    def skip(self, name: str, detail: str) -> Check:
        return self.add(name, "skip", detail)

    @property
    def problems(self) -> list[str]:
        """One line per failed check: `<check>: <what is wrong and what to do>`."""
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status == "FAIL"]

    def table(self) -> str:
        width = max((len(c.name) for c in self.checks), default=5)
        lines = [f"{'check':<{width}}  result  detail"]
        lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in self.checks]
        failed = len(self.problems)
        lines.append(f"preflight: {len(self.checks)} checks, {failed} failed, "
                     f"{sum(c.status == 'warn' for c in self.checks)} warnings, {self.seconds:.1f} s")
        return "\n".join(lines)


class PreflightError(UserError):
    """The preflight found problems; the message has one line per problem."""

    def __init__(self, report: Report) -> None:
        super().__init__("\n".join(report.problems))
        self.report = report


def require(report: Report) -> Report:
    """`report` when nothing failed, else PreflightError."""
    if report.problems:
        raise PreflightError(report)
    return report
