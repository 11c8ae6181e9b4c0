"""Dependency audit: pip-audit over the installed environment, with accepted findings.

    python tools/audit.py [--ignore-file audit-ignore.txt] [--from-json recorded.json]

Runs `pip-audit` on this interpreter's environment (the editable attnflow project
itself is skipped: it is not a published dependency) and decides:

- a finding whose ID (or one of its aliases) is listed in the ignore file passes;
- any other finding fails the audit (exit 1), one line per finding;
- when pip-audit could audit no dependency at all (its vulnerability service is
  unreachable: every dependency comes back "could not be audited", or pip-audit
  itself dies on a connection error), one WARNING line says the audit did not run
  and why, and the exit status is 0, so that an offline machine can still run
  `make test`. The warning is the honest result: nothing was checked.

Ignore file format, one accepted finding a line (the justification is required):

    PYSEC-2024-1  # only reachable through X, which attnflow never calls
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("attnflow.audit")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IGNORE = REPO / "audit-ignore.txt"

# What pip-audit says when it cannot reach or query its vulnerability service.
UNREACHABLE_SKIP = re.compile(r"could not be audited", re.IGNORECASE)
EDITABLE_SKIP = re.compile(r"editable", re.IGNORECASE)
CONNECTION_ERROR = re.compile(
    r"ConnectionError|Max retries exceeded|Failed to establish a new connection|"
    r"Name or service not known|Temporary failure in name resolution|timed out|"
    r"Connection refused|Network is unreachable",
    re.IGNORECASE,
)


class AuditError(Exception):
    """The audit could not be decided (bad ignore file, pip-audit failed for another reason)."""


@dataclass(frozen=True)
class Finding:
    """One known vulnerability in one installed package."""

    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    fix_versions: tuple[str, ...]

    def line(self) -> str:
        """One line for the report."""
        fix = ", ".join(self.fix_versions) or "no fix released"
        also = f" (aka {', '.join(self.aliases)})" if self.aliases else ""
        return f"{self.package} {self.version}: {self.id}{also}; fixed in: {fix}"


@dataclass(frozen=True)
class Verdict:
    """What the audit decided: exit status and the lines to print."""

    status: int
    lines: tuple[str, ...]


def read_ignore_file(path: Path) -> dict[str, str]:
    """{finding ID: justification}; a listed ID without a justification is an error."""
    accepted: dict[str, str] = {}
    if not path.exists():
        return accepted
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        vuln_id, _, why = line.partition("#")
        vuln_id, why = vuln_id.strip(), why.strip()
        if not vuln_id or " " in vuln_id:
            raise AuditError(f"{path}:{n}: expected 'ID  # why', got {raw!r}")
        if not why:
            raise AuditError(f"{path}:{n}: {vuln_id} is ignored without a justification")
        accepted[vuln_id] = why
    return accepted


def findings(report: dict[str, Any]) -> list[Finding]:
    """Every vulnerability in a pip-audit JSON report."""
    out = []
    for dep in report.get("dependencies", []):
        for vuln in dep.get("vulns") or []:
            out.append(
                Finding(
                    package=str(dep.get("name")),
                    version=str(dep.get("version", "?")),
                    id=str(vuln.get("id")),
                    aliases=tuple(map(str, vuln.get("aliases") or ())),
                    fix_versions=tuple(map(str, vuln.get("fix_versions") or ())),
                )
            )
    return out


def skip_of(dep: dict[str, Any]) -> str:
    """Why pip-audit skipped a dependency ("" when it was audited)."""
    return str(dep.get("skip_reason", ""))


def unreachable_reason(report: dict[str, Any] | None, stderr: str) -> str | None:
    """Why no dependency could be audited, or None when the audit really ran.

    Only when *no* dependency was audited: a few local-only packages (not on PyPI)
    are skipped on any machine, and the rest of the audit still stands.
    """
    if report is None:
        match = CONNECTION_ERROR.search(stderr)
        return f"pip-audit failed to connect ({match.group(0)})" if match else None
    # The editable project is skipped on purpose (`--skip-editable`): not a failure to audit.
    deps = [d for d in report.get("dependencies", []) if not EDITABLE_SKIP.search(skip_of(d))]
    if not deps:
        return None
    skipped = [d for d in deps if "skip_reason" in d]
    if len(skipped) < len(deps):
        return None
    if all(UNREACHABLE_SKIP.search(skip_of(d)) for d in skipped):
        return (
            f"none of the {len(deps)} dependencies could be audited "
            f"(e.g. {skipped[0]['skip_reason']!r}): the vulnerability service is unreachable"
        )
    return None


def decide(report: dict[str, Any] | None, stderr: str, accepted: dict[str, str]) -> Verdict:
    """The audit's verdict from pip-audit's JSON report (None if it wrote none) and stderr."""
    why = unreachable_reason(report, stderr)
    if why is not None:
        return Verdict(0, (f"WARNING: dependency audit could not run: {why}",))
    if report is None:
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        raise AuditError(f"pip-audit wrote no report: {tail[0]}")
    found = findings(report)
    open_ = [f for f in found if not ({f.id, *f.aliases} & accepted.keys())]
    ignored = len(found) - len(open_)
    audited = sum(1 for d in report.get("dependencies", []) if "skip_reason" not in d)
    if open_:
        lines = [f"FAIL: {f.line()}" for f in open_]
        lines.append(
            f"dependency audit failed: {len(open_)} finding(s) not in the ignore file "
            f"({ignored} accepted)"
        )
        return Verdict(1, tuple(lines))
    return Verdict(
        0, (f"dependency audit passed: {audited} packages, {ignored} accepted finding(s)",)
    )


def run_pip_audit(timeout: float = 600.0) -> tuple[dict[str, Any] | None, str]:
    """pip-audit's JSON report of this environment (None if it wrote none) and its stderr."""
    cmd = [
        sys.executable,
        "-m",
        "pip_audit",
        "--skip-editable",
        "--format",
        "json",
        "--progress-spinner",
        "off",
        "--timeout",
        "15",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    # Exit 1 only means "vulnerabilities found": the report says which, and decides.
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        report = None
    return report, proc.stderr


def main(argv: list[str] | None = None) -> int:
    """CLI: audit, print the verdict, return the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ignore-file", type=Path, default=DEFAULT_IGNORE)
    p.add_argument("--from-json", type=Path, help="decide on a recorded pip-audit JSON report")
    args = p.parse_args(argv)
    try:
        accepted = read_ignore_file(args.ignore_file)
        if args.from_json:
            report, stderr = json.loads(args.from_json.read_text()), ""
        else:
            report, stderr = run_pip_audit()
        verdict = decide(report, stderr, accepted)
    except (AuditError, OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        print(f"dependency audit error: {exc}", file=sys.stderr)
        return 2
    for line in verdict.lines:
        print(line, file=sys.stderr if verdict.status else sys.stdout)
    return verdict.status


if __name__ == "__main__":
    sys.exit(main())
