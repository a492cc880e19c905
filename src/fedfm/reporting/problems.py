"""What went wrong in a round, in the same words everywhere (console, report, dashboard): a
skipped round, an update the server rejected (it arrived and failed validation), a client that
failed (it delivered no usable update: training, decoding, secure aggregation, timeout, …)."""

from __future__ import annotations


def client_label(entry: dict) -> str:
    """``client 3``, or the site's name beside its index where the record carries one."""
    name = entry.get("name")
    return f"client {entry['client']}" + (f" ({name})" if name else "")


def problems(record: dict) -> list[str]:
    """One line per problem of a round record (``skipped``, ``rejected``, ``failed``)."""
    lines = [str(record["skipped"])] if record.get("skipped") else []
    lines += [f"update of {client_label(r)} rejected: {r['reason']}" for r in record.get("rejected", [])]
    lines += [f"{client_label(f)} failed at {f['stage']}: {f['reason']}" for f in record.get("failed", [])]
    return lines
