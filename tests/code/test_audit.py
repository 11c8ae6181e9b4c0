"""tools/audit.py: which pip-audit results fail `make test`, pass, or only warn.

`pip_audit/unreachable.json` is pip-audit 2.10.1's real output on a machine that cannot
reach its vulnerability service (trimmed to a few packages); `pip_audit/finding.json`
is a report in the same JSON schema with one known finding, as pip-audit writes it
when the service answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.audit import AuditError, decide, main, read_ignore_file

RECORDED = Path(__file__).parent / "pip_audit"


def _report(name: str) -> dict:
    return json.loads((RECORDED / name).read_text())


def test_a_finding_not_in_the_ignore_file_fails():
    verdict = decide(_report("finding.json"), "", accepted={})
    assert verdict.status == 1
    assert any("requests 2.32.3: GHSA-9hjg-9r4m-mvj7" in line for line in verdict.lines)
    assert "1 finding(s) not in the ignore file" in verdict.lines[-1]


@pytest.mark.parametrize("listed", ["GHSA-9hjg-9r4m-mvj7", "CVE-2024-47081"])
def test_a_finding_ignored_by_id_or_alias_passes(listed):
    verdict = decide(_report("finding.json"), "", accepted={listed: "why"})
    assert verdict.status == 0
    assert verdict.lines == ("dependency audit passed: 2 packages, 1 accepted finding(s)",)


def test_an_unreachable_service_warns_in_one_line_and_passes():
    verdict = decide(_report("unreachable.json"), "", accepted={})
    assert verdict.status == 0
    (line,) = verdict.lines
    assert line.startswith("WARNING: dependency audit could not run:")
    assert "none of the 5 dependencies could be audited" in line  # the editable one aside


def test_a_connection_error_without_a_report_warns_and_anything_else_is_an_error():
    stderr = "requests.exceptions.ConnectionError: Max retries exceeded with url: /pypi/x/json"
    assert decide(None, stderr, {}).lines[0].startswith("WARNING: dependency audit could not run")
    with pytest.raises(AuditError, match="pip-audit wrote no report: Traceback"):
        decide(None, "Traceback", {})


def test_a_partly_audited_environment_is_judged_not_excused():
    """Local-only packages are skipped on any machine; the rest of the audit still counts."""
    report = _report("finding.json")
    report["dependencies"] = [d for d in report["dependencies"] if d["name"] != "requests"]
    assert decide(report, "", {}).status == 0
    report["dependencies"].append(_report("finding.json")["dependencies"][0])
    assert decide(report, "", {}).status == 1


def test_ignore_file_needs_a_justification(tmp_path):
    good = tmp_path / "ok.txt"
    good.write_text("# accepted\n\nGHSA-1  # only in a code path attnflow never calls\n")
    assert read_ignore_file(good) == {"GHSA-1": "only in a code path attnflow never calls"}
    bad = tmp_path / "bad.txt"
    bad.write_text("GHSA-2\n")
    with pytest.raises(AuditError, match="without a justification"):
        read_ignore_file(bad)


def test_cli_exit_status_from_a_recorded_report(tmp_path, capsys):
    ignore = tmp_path / "ignore.txt"
    ignore.write_text("")
    assert main(["--ignore-file", str(ignore), "--from-json", str(RECORDED / "finding.json")]) == 1
    assert "FAIL: requests" in capsys.readouterr().err
    unreachable = str(RECORDED / "unreachable.json")
    assert main(["--ignore-file", str(ignore), "--from-json", unreachable]) == 0
    assert capsys.readouterr().out.startswith("WARNING:")
    ignore.write_text("CVE-2024-47081  # accepted for the test\n")
    finding = str(RECORDED / "finding.json")
    assert main(["--ignore-file", str(ignore), "--from-json", finding]) == 0


def test_the_repositorys_ignore_file_parses():
    read_ignore_file(Path(__file__).resolve().parents[2] / "audit-ignore.txt")
