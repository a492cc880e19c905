"""The privacy.dp modes and what each guarantees, in words (no dependency: the report needs it)."""

from dataclasses import dataclass

from fedfm.registry import Registry

GUARANTEES = {
    "none": "none: no differential privacy",
    "client": "client-level (ε, δ)-DP: any one client's whole data changes the released models little",
    "example": "example-level (ε, δ)-DP per client (DP-SGD): one training example changes its client's "
    "updates little; clients as a whole are not protected",
}


@dataclass(frozen=True)
class DpMode:
    """A ``privacy.dp`` mode: whether it protects whole clients (noise on the aggregate) or single
    examples (DP-SGD inside local training), and its guarantee in words."""

    client_level: bool
    example_level: bool
    guarantee: str

    @property
    def active(self) -> bool:
        return self.client_level or self.example_level


DP_MODES: Registry[DpMode] = Registry("DP mode")
for _name, _client, _example in (("none", False, False), ("client", True, False), ("example", False, True)):
    DP_MODES.register(_name)(DpMode(_client, _example, GUARANTEES[_name]))


def dp_mode(cfg) -> DpMode:
    return DP_MODES.get(cfg.privacy.dp)


SEEDED = (
    "the noise was drawn from privacy.noise_seed, so the guarantee does not hold against anyone who "
    "knows the seed"
)

MECHANISMS = {
    "gaussian": "Gaussian noise added to the clipped sum",
    "skellam": "distributed Skellam noise added by the clients under secure aggregation (no "
    "amplification by sampling claimed)",
}


def require_privacy_extra(field: str) -> None:
    """``ValueError`` naming ``field`` and the extra to install when the privacy extra is missing."""
    import importlib.util

    missing = [m for m in ("dp_accounting", "cryptography", "opacus") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"{field} needs the privacy extra ({', '.join(missing)} missing): pip install 'fedfm[privacy]'"
        )
