"""The shape of the package: no import cycle anywhere (imports inside functions included), a top
level that holds only the front doors and the shared vocabulary, and import-linter's layer
contract covering every package (``pyproject.toml``; ``make test`` runs ``lint-imports``)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp

import fedfm

SRC = Path(fedfm.__file__).parent


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_import_graph_has_no_cycle():
    graph = grimp.build_graph("fedfm")  # every import statement, those inside functions too
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: two modules that import each other (one inside a function)."""
    pkg = tmp_path / "circle"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circle import b\n")
    (pkg / "b.py").write_text("def f():\n    from circle import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles(grimp.build_graph("circle")) == [["circle.a", "circle.b"]]


def test_the_top_level_holds_only_the_front_doors_and_the_vocabulary():
    """The front doors (api, cli, hf: your own Trainer script) and the vocabulary every layer
    shares: types, the registry, seeding; the wire format (what a payload is as bytes, used by
    the deployment and by split fine-tuning's two halves) is the package wire/."""
    modules = sorted(p.stem for p in SRC.glob("*.py"))
    assert modules == ["__init__", "api", "cli", "hf", "registry", "seeding", "types"]
    assert (SRC / "wire" / "__init__.py").exists()


def test_the_layer_contract_names_every_package_and_module():
    """``exhaustive = true`` makes lint-imports refuse a package missing from the layers; this
    checks that the contract is exhaustive and names what exists."""
    config = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    (layers,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    assert layers["exhaustive"] is True and layers["containers"] == ["fedfm"]
    named = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    present = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    present |= {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert named == present


def test_a_payload_type_without_what_the_wire_needs_is_refused():
    import dataclasses

    import pytest

    from fedfm.types import PAYLOADS, payload

    @dataclasses.dataclass(frozen=True)
    class Sketch:
        values: dict
        kind = "sketch"
        dense = False

        def tensors(self):
            return {"p": self.values}

    with pytest.raises(TypeError, match="from_wire"):
        payload(Sketch)
    assert "sketch" not in PAYLOADS and set(PAYLOADS) == {"encoded", "masked", "split", "update"}


def test_components_are_asked_for_capabilities_not_names():
    """A subclass of the in-process engine is in-process; the batched engine trains in groups;
    Krum's minimum cohort comes from its own rule; FedRep trains in two phases."""
    from fedfm.algorithms.personal import PERSONAL_METHODS
    from fedfm.algorithms.robust import min_cohort
    from fedfm.config import StrategySection
    from fedfm.engines import ENGINES, EngineTraits, InProcessEngine
    from fedfm.engines.batched import BatchedEngine

    class Mine(InProcessEngine):
        pass

    cfg = fedfm.RunConfig()
    assert EngineTraits.of(Mine, cfg).in_process and not EngineTraits.of(BatchedEngine, cfg).in_process
    assert EngineTraits.of(ENGINES.get("batched"), cfg).grouped == "run.engine = 'batched'"
    assert EngineTraits.of(ENGINES.get("ray"), cfg).section == "ray"
    assert min_cohort(StrategySection(aggregator="bulyan", byzantine=2)) == 11
    assert min_cohort(StrategySection(aggregator="median")) == 1
    assert PERSONAL_METHODS.get("fedrep").phases and not PERSONAL_METHODS.get("fedper").phases


def test_an_option_that_clashes_with_a_field_registers_nothing():
    """A plug-in whose options clash with a field of the section is refused before any of its
    fields is added, and its name is not registered."""
    import pytest
    from pydantic import BaseModel

    from fedfm.algorithms.aggregators import AGGREGATORS
    from fedfm.config import StrategySection

    class Clash(BaseModel):
        clash_probe_count: int = 1  # would be new
        trim_ratio: int = 3  # the section's trim_ratio is a float, 0.1

    with pytest.raises(TypeError, match="trim_ratio"):
        AGGREGATORS.register("clash-probe", options=Clash)(lambda updates: None)
    assert "clash_probe_count" not in StrategySection.model_fields and "clash-probe" not in AGGREGATORS
