"""``fedfm audit``: attack fedfm's own privacy promises on a run's configuration, and say what each
defense buys.

Each attack is an entry of ``AUDITS`` (an ``AuditKind``) that carries its behaviour (``run``), its
own options (a pydantic model; set as ``--set NAME.FIELD=VALUE``), what it needs (the run's final
model, or only the configuration) and a one-line description:

- ``inversion`` (``fedfm.audit.inversion``): a curious server inverts one client's update —
  label counts from the head's bias, tokens (and their order) from the first layer's span —
  on your configuration, in the attack's best case, under secure aggregation of m clients and
  under client-level DP at ε;
- ``canaries`` (``fedfm.audit.canaries``): canary clients against the run's client-level DP —
  Steinke et al.'s one-run 95% lower bound and Andrew et al.'s estimate beside the reported ε;
- ``membership`` (``fedfm.audit.membership``): loss-threshold and reference-calibrated
  membership inference on the final global model (AUC, TPR at 1% FPR);
- ``observed`` (``fedfm.audit.observed``): what the server sees per client in the clear (loss,
  example count) and a property attack on it (is this client's data skewed?).

The pure maths lives apart (``scores``, ``epsilon``, ``span``, ``labels``); ``runner`` builds the
run, runs the chosen attacks within ``--budget`` and writes ``audit.json`` and ``audit.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from fedfm.registry import Registry


@dataclass(frozen=True)
class AuditKind:
    """One attack: ``run(context, options) -> dict`` (its rows and notes), its options model, a
    one-line description, ``table(result) -> str`` (its markdown table), and whether it needs the
    run's final global model (``needs_final``)."""

    run: Callable
    options: type[BaseModel]
    describe: str
    table: Callable
    needs_final: bool = False


AUDITS: Registry[AuditKind] = Registry("audit")
