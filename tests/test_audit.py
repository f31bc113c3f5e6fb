"""The dependency audit (scripts/audit.sh: pip-audit --strict over requirements.lock).

Tests reach nothing beyond loopback, so the audit is tested against a vulnerability service of their own: an OSV
API (pip-audit's `--vulnerability-service osv --osv-url`) served on 127.0.0.1 that reports what each test decides.
A clean report passes, a finding fails naming the package and the id, an accepted finding (docs/dependency-audit.md,
passed as --ignore-vuln) passes, a service that cannot answer fails rather than passing on an audit that looked at
nothing. The audit of the real vulnerability databases reaches the internet: it runs where DLM_AUDIT_ONLINE=1 (a
machine that allows it), or as `scripts/audit.sh` itself; elsewhere that one test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from conftest import ROOT

AUDIT = ROOT / "scripts" / "audit.sh"
TEST_FINDING = "GHSA-test-0000-0001"  # an id no real database has


def accepted_findings() -> list[str]:
    """Vulnerability ids docs/dependency-audit.md accepts, each with its reason."""
    page = (ROOT / "docs" / "dependency-audit.md").read_text()
    return re.findall(r"^\| `?((?:PYSEC|GHSA|CVE)-[\w-]+)`? \|", page, flags=re.M)


def ignore_accepted() -> list[str]:
    """The audit's arguments that accept the page's findings."""
    return [arg for finding in accepted_findings() for arg in ("--ignore-vuln", finding)]


def locked() -> dict[str, str]:
    """requirements.lock as {canonical name: version}."""
    lines = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and line[0] != "#"]
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in (line.split("==") for line in lines)}


def test_the_audit_page_lists_the_accepted_findings():
    """The bundled tritonserver 2.51's known findings are on the page, where the audit reads them."""
    assert {"CVE-2025-23310", "CVE-2025-23311", "CVE-2025-23319", "CVE-2025-23320",
            "CVE-2025-23334"} <= set(accepted_findings())


def test_every_locked_package_is_pinned():
    lines = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and line[0] != "#"]
    assert lines and all(re.fullmatch(r"[\w.\-]+==[\w.+\-!]+", line) for line in lines), lines
    assert any(line.startswith("torch==2.13.0") for line in lines)


# --- the audit against a vulnerability service on loopback ---------------------------------------------------------
class OSV:
    """OSV's query API (POST /v1/query {"package": {"name", "ecosystem"}, "version"}) on 127.0.0.1: `findings`
    maps (package, version) to vulnerability ids; `status` other than 200 makes every answer an error."""

    def __init__(self) -> None:
        self.findings: dict[tuple[str, str], list[str]] = {}
        self.status = 200
        self.queried: list[tuple[str, str]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                package = (query["package"]["name"], query["version"])
                service.queried.append(package)
                body: dict[str, Any] = {}
                ids = service.findings.get(package, [])
                if ids:
                    body = {"vulns": [{"id": i, "summary": f"{i}: a finding of the test's own service",
                                       "affected": [{"package": {"name": package[0], "ecosystem": "PyPI"},
                                                     "ranges": [{"type": "ECOSYSTEM", "events": [
                                                         {"introduced": "0"}, {"fixed": "999"}]}]}]}
                                      for i in ids]}
                data = json.dumps(body).encode()
                self.send_response(service.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/query"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def audit(self, *args: str) -> subprocess.CompletedProcess:
        """scripts/audit.sh against this service (`--timeout 5`: a service that does not answer fails quickly)."""
        self.queried.clear()
        env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        return subprocess.run([str(AUDIT), "--vulnerability-service", "osv", "--osv-url", self.url, "--timeout", "5",
                               *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def osv() -> Iterator[OSV]:
    service = OSV()
    yield service
    service.server.shutdown()


def test_the_audit_fails_on_a_finding_and_passes_once_it_is_accepted(osv):
    versions = locked()
    osv.findings = {("numpy", versions["numpy"]): [TEST_FINDING],
                    ("nvidia-pytriton", versions["nvidia-pytriton"]): accepted_findings()}
    found = osv.audit(*ignore_accepted())
    assert found.returncode == 1, found.stdout + found.stderr
    assert re.search(rf"^numpy\s+{re.escape(versions['numpy'])}\s+{TEST_FINDING}\b", found.stdout, re.M), found.stdout
    assert "CVE-2025-23310" not in found.stdout  # the page's accepted findings are ignored
    assert sorted(set(osv.queried)) == sorted(versions.items())  # every locked package, at its pinned version
    accepted = osv.audit(*ignore_accepted(), "--ignore-vuln", TEST_FINDING)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    osv.findings = {}
    clean = osv.audit()
    assert clean.returncode == 0 and "No known vulnerabilities found" in clean.stdout + clean.stderr, clean


def test_an_audit_whose_service_cannot_answer_fails(osv):
    osv.findings, osv.status = {}, 503
    try:
        failed = osv.audit()
    finally:
        osv.status = 200
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "No known vulnerabilities found" not in failed.stdout + failed.stderr


# --- the audit of the real databases (beyond loopback: opt-in) -------------------------------------------------------
@pytest.mark.skipif(os.environ.get("DLM_AUDIT_ONLINE") != "1",
                    reason="the audit of the real vulnerability databases reaches PyPI's JSON API, beyond loopback: "
                           "set DLM_AUDIT_ONLINE=1 where that is allowed, or run scripts/audit.sh")
def test_locked_dependencies_have_no_unaccepted_vulnerabilities():
    audit = subprocess.run([str(AUDIT), *ignore_accepted()], capture_output=True, text=True, timeout=900)
    assert audit.returncode == 0, audit.stdout + audit.stderr
