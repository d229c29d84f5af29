"""pytest plugin for device runs: write each failure's traceback to $FXFUSE_FAILURES as it happens
(a run cut off by the call's time limit still tells what failed and why)."""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("FXFUSE_FAILURES")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when}, {report.duration:.1f}s)\n{report.longreprtext[-6000:]}\n")
