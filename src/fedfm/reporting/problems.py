"""What went wrong in a round, in the same words everywhere (console, report, dashboard): a
skipped round, an update the server rejected (it arrived and failed validation), a client that
failed (it delivered no usable update: training, decoding, secure aggregation, timeout, …)."""

from __future__ import annotations


def client_label(entry: dict) -> str:
    """``client 3``, or the site's name beside its index where the record carries one."""
    name = entry.get("name")
    return f"client {entry['client']}" + (f" ({name})" if name else "")


def problems(record: dict) -> list[str]:
    """One line per problem of a round record (``skipped``, ``rejected``, ``failed``, ``dropped``)."""
    lines = [str(record["skipped"])] if record.get("skipped") else []
    lines += [f"update of {client_label(r)} rejected: {r['reason']}" for r in record.get("rejected", [])]
    lines += [f"{client_label(f)} failed at {f['stage']}: {f['reason']}" for f in record.get("failed", [])]
    lines += [f"{client_label(d)} dropped: {d['reason']}" for d in record.get("dropped", [])]
    return lines


SITE_LISTS = ("failed", "rejected", "dropped")  # a round record's per-client lists


def name_sites(names: dict[int, str], record: dict, clients: list[dict]) -> None:
    """Each client entry of a round (its client records, and its failed, rejected and dropped
    lists) gets its site's ``name`` beside the index, where the run knows names."""
    if not names:
        return
    for entry in [*clients, *(e for key in SITE_LISTS for e in record.get(key) or [])]:
        name = names.get(int(entry.get("client", -1)))
        if name is not None:
            entry["name"] = name
