"""Reporting: the metrics log, console progress, plots and the self-contained HTML report."""
