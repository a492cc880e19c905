"""Tables rendered from results files, and the check that every measured table has a source.

``sweep_table``: a sweep entry's groups (rows) with each measurement as mean ± 95% interval over
its seeds. ``claims_table``: each claim of ``docs/results/claims.toml`` with the anchor, fedfm's
number (the paired difference over shared seeds) and the verdict. ``numeric_tables``: the
markdown tables of a document that hold measured-looking numbers outside ``results`` markers —
each must be listed, with its reason, in ``docs/results/unsourced.toml`` until it is converted.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fedfm.reproduce.results import Measurement, measurements
from fedfm.reproduce.stats import interval, paired

DIGITS = {"seconds": 0, "mb": 0, "ratio": 2, "throughput": 1, "rounds": 1, "count": 0}


def _cell(m: Measurement | None) -> str:
    if m is None:
        return "—"
    iv = interval(m.values)
    if m.kind == "bytes":
        spread = "" if iv.half in (None, 0.0) else f" ± {iv.half / 1e6:,.2f}"
        return f"{iv.mean / 1e6:,.2f}{spread} MB"
    return iv.format(DIGITS.get(m.kind, 3))


def scaled(divisor: float, digits: int) -> Callable[[Measurement | None], str]:
    """A cell in other units (bytes → MB: ``scaled(1e6, 1)``): mean ± 95% half-width, the value
    alone where every seed gave the same."""

    def cell(m: Measurement | None) -> str:
        return "—" if m is None else _spread([v / divisor for v in m.values], digits)

    return cell


def _spread(values: list[float], digits: int) -> str:
    """Mean ± 95% half-width at ``digits`` decimals, thousands separated; the mean alone where the
    half-width rounds to zero (every seed the same, to the digits shown)."""
    iv = interval(values)
    half = f"{iv.half or 0.0:,.{digits}f}"
    return f"{iv.mean:,.{digits}f}" + ("" if float(half.replace(",", "")) == 0 else f" ± {half}")


Column = tuple  # (header, [measurement names, shown "a / b"], optional cell format)


def sweep_table(
    data: dict,
    names: list[str] | None = None,
    columns: list[Column] | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    """Rows: the groups (the swept fields other than the seed); columns: ``names`` (default every
    measurement), each as mean ± the half-width of its 95% interval. ``columns``: headers of
    one or more measurements each (``"mean / worst"``) with their own format; ``labels``: a row
    label for each group's swept values (joined by ", "), in place of the axes."""
    found = measurements(data)
    names = names or list(dict.fromkeys(m.name for m in found))
    columns = columns or [(n, [n]) for n in names]
    groups: dict[tuple, dict[str, Measurement]] = {}
    for m in found:
        groups.setdefault(tuple(m.group.items()), {})[m.name] = m
    axes = [k for k, _ in next(iter(groups))] if groups else []
    lead = ["cell"] if labels else axes
    head = [*lead, "seeds", *(c[0] for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(lead) + " ---: |" * (1 + len(columns))]
    for key, row in groups.items():
        n = max(len(m.seeds) for m in row.values())
        said = ", ".join(str(v) for _, v in key)
        first = [labels.get(said, said)] if labels else [str(v) for _, v in key]
        cells = [" / ".join((c[2] if len(c) > 2 else _cell)(row.get(x)) for x in c[1]) for c in columns]
        lines.append("| " + " | ".join([*first, str(n), *cells]) + " |")
    seeds = ", ".join(str(s) for s in data.get("seeds", []))
    m = data.get("machine", {})
    lines += [
        "",
        f"Mean ± the half-width of a 95% Student-t interval over seeds {seeds}; "
        f"`{data.get('benchmark')}`, fedfm {data.get('fedfm_version')}, {m.get('cpus')} CPUs"
        f"{' (' + m['cpu'] + ')' if m.get('cpu') else ''}, {data.get('wall_s', 0) / 60:.0f} min in all.",
    ]
    return "\n".join(lines)


def find(data: dict, name: str, group: dict) -> Measurement:
    want = {k: str(v) for k, v in group.items()}
    for m in measurements(data):
        if m.name == name and {k: str(v) for k, v in m.group.items()} == want:
            return m
    raise KeyError(f"no measurement {name!r} with group {group} in {data.get('benchmark')}")


VERDICTS = {
    "better": "confirmed",
    "worse": "contradicted",
    "no clear difference": "not confirmed: no clear difference",
}


def _p(p: float) -> str:
    return f"= {p:.2g}" if p >= 1e-4 else "< 1e-4"


UNITS = {"bytes moved": (1e6, "MB", 2)}  # a claim's own ``unit = ["GFLOPs", 1e9, 1]`` wins


def _unit(claim: dict, name: str) -> Callable[[list[float]], str]:
    """How a claim shows values of ``name``: mean ± 95% half-width, in the claim's unit."""
    unit = claim.get("unit") if name == claim["measurement"] else None
    scale, label, digits = (unit[1], unit[0], unit[2]) if unit else UNITS.get(name, (1.0, "", 3))

    def show(values: list[float]) -> str:
        return f"{_spread([v / scale for v in values], digits)} {label}".rstrip()

    return show


def _sides(claim: dict, data: dict, name: str) -> tuple[dict[int, float], dict[int, float], str]:
    """Seed → value of the claim's two sides for measurement ``name``; with ``c`` and ``d``, the
    sides are the differences a − b and c − d (an interaction: is the gap larger here than there?)."""
    a, b = (find(data, name, claim[k]) for k in ("a", "b"))
    show = _unit(claim, name)
    if "c" not in claim:
        said = f"{claim['a_label']} {show(a.values)} vs {claim['b_label']} {show(b.values)}"
        return a.by_seed(), b.by_seed(), said
    c, d = (find(data, name, claim[k]) for k in ("c", "d"))

    def gap(x, y):
        xs, ys = x.by_seed(), y.by_seed()
        return {s: xs[s] - ys[s] for s in sorted(set(xs) & set(ys))}

    ab, cd = gap(a, b), gap(c, d)
    said = f"{claim['a_label']}: {show(list(ab.values()))} vs {claim['b_label']}: {show(list(cd.values()))}"
    return ab, cd, said


def claim_row(claim: dict, load: Callable[[str], dict]) -> str:
    """One claim: what it says, the anchor, fedfm's measured number and the verdict."""
    anchor = claim.get("anchor", "no anchor")
    for status in ("out_of_reach", "pending"):
        if claim.get(status):
            label = "out of reach here" if status == "out_of_reach" else "not yet judged"
            return f"| {claim['claim']} | {anchor} | — | {label}: {claim[status]} |"
    data = load(claim["results"])
    higher = claim.get("higher_is_better", True)
    a, b, said = _sides(claim, data, claim["measurement"])
    test = paired(a, b, higher)
    diff = _unit(claim, claim["measurement"])([a[s] - b[s] for s in sorted(set(a) & set(b))])
    said += f" ({claim['measurement']}); difference {diff}, p {_p(test.p)}"
    said += f", n = {test.difference.n} seeds"
    if claim.get("ratio"):  # the b side over the a side, e.g. bytes moved
        ratio = interval(list(b.values())).mean / interval(list(a.values())).mean
        said += f"; {claim['ratio']}: {ratio:,.{0 if ratio >= 10 else 2}f}×"
    if claim.get("also"):  # another measurement between the same sides, for context
        x, y, _ = _sides(claim, data, claim["also"])
        t = paired(x, y, claim.get("also_higher_is_better", True))
        said += f"; {claim['also']}: {t.difference.format(3)}, {t.verdict} (p {_p(t.p)})"
    return f"| {claim['claim']} | {anchor} | {said} | **{VERDICTS[test.verdict]}** |"


def claims_table(claims: list[dict], load: Callable[[str], dict]) -> str:
    lines = ["| claim | anchor (published) | fedfm, measured | verdict |", "| --- | --- | --- | --- |"]
    lines += [claim_row(c, load) for c in claims]
    lines += [
        "",
        "Verdicts come from a paired t-test over the seeds both settings share (two-sided, α = 0.05): "
        "confirmed when the claimed direction is significant, contradicted when the opposite is, "
        "otherwise no clear difference. Intervals are 95% Student-t intervals.",
    ]
    return "\n".join(lines)


NUMBER = re.compile(r"(?<![\w.`])\d+\.\d+(?![\w`])|\d{1,3}(?:,\d{3})+")
MARKER = re.compile(r"<!-- (/?)results:([\w./-]+) -->")


def numeric_tables(text: str) -> list[tuple[int, str]]:
    """(line number, header row) of each markdown table outside ``results`` markers whose body
    holds a decimal or thousands-separated number (a measured-looking value)."""
    found, inside, table, start = [], 0, [], 0
    lines = text.splitlines()
    for i, line in enumerate([*lines, ""], 1):
        m = MARKER.search(line)
        if m:
            inside += -1 if m.group(1) else 1
        if line.startswith("|") and not inside:
            if not table:
                start = i
            table.append(line)
            continue
        if table:
            body = [r for r in table[2:]]
            if any(NUMBER.search(r) for r in body):
                found.append((start, table[0].strip()))
            table = []
    return found
