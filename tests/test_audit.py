"""The dependency audit (scripts/audit.sh: pip-audit over requirements.lock). It needs a vulnerability service;
where none answers, the test skips and says so, rather than passing on an audit that looked at nothing."""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import ROOT


def vulnerability_service_reachable() -> bool:
    """pip-audit's default source is PyPI's per-release JSON API (its `vulnerabilities` field)."""
    try:
        with urllib.request.urlopen("https://pypi.org/pypi/pip/24.0/json", timeout=10) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def accepted_findings() -> list[str]:
    """Vulnerability ids docs/dependency-audit.md accepts, each with its reason."""
    page = (ROOT / "docs" / "dependency-audit.md").read_text()
    return re.findall(r"^\| `?((?:PYSEC|GHSA|CVE)-[\w-]+)`? \|", page, flags=re.M)


def test_the_audit_page_lists_the_accepted_findings():
    """The bundled tritonserver 2.51's known findings are on the page, where the audit reads them."""
    assert {"CVE-2025-23310", "CVE-2025-23311", "CVE-2025-23319", "CVE-2025-23320",
            "CVE-2025-23334"} <= set(accepted_findings())


def test_every_locked_package_is_pinned():
    lines = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and line[0] != "#"]
    assert lines and all(re.fullmatch(r"[\w.\-]+==[\w.+\-!]+", line) for line in lines), lines
    assert any(line.startswith("torch==2.13.0") for line in lines)


@pytest.mark.skipif(not vulnerability_service_reachable(),
                    reason="no vulnerability service answers from this machine (PyPI's per-release JSON API, "
                           "pip-audit's source, returns 404 here); run scripts/audit.sh where it does")
def test_locked_dependencies_have_no_unaccepted_vulnerabilities():
    ignores = [arg for finding in accepted_findings() for arg in ("--ignore-vuln", finding)]
    audit = subprocess.run([str(ROOT / "scripts" / "audit.sh"), *ignores], capture_output=True, text=True,
                           timeout=900)
    assert audit.returncode == 0, audit.stdout + audit.stderr
