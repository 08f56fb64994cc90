"""Suite-wide rules.

With XLSTM_STRICT=1 (set by .ci/run) a skipped test fails, unless it is marked
`gpu`: CI has no GPU, everything else the suite checks must really run there.
"""

from __future__ import annotations

import os

import pytest

STRICT = os.environ.get("XLSTM_STRICT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and item.get_closest_marker("gpu") is None:
        if hasattr(report, "wasxfail"):
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"XLSTM_STRICT=1: required test was skipped: {reason}"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """(tokenizer dir, shard dir with a val/ split) of the demo corpus, made once."""
    from pretrain.demo import prepare_data

    return prepare_data(tmp_path_factory.mktemp("corpus"))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A whole module skipped at import (e.g. `pytest.importorskip`) fails too under
    XLSTM_STRICT=1: the per-test hook above never sees it."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"XLSTM_STRICT=1: required module was skipped: {reason}"
