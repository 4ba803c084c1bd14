"""What a person reads: a run's pictures and files (run.py), report.html (page.py), and the
matplotlib drawings (plots.py)."""

from headstart.io.runfolder import read_summary as load_run  # (its old name, until headstart 0.2)
from headstart.report.page import write_report

__all__ = ["load_run", "write_report"]
