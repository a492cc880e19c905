"""What each privacy.dp setting guarantees, in words (no dependency: the report needs it)."""

GUARANTEES = {
    "none": "none: no differential privacy",
    "client": "client-level (ε, δ)-DP: any one client's whole data changes the released models little",
    "example": "example-level (ε, δ)-DP per client (DP-SGD): one training example changes its client's "
    "updates little; clients as a whole are not protected",
}

SEEDED = (
    "the noise was drawn from privacy.noise_seed, so the guarantee does not hold against anyone who "
    "knows the seed"
)

MECHANISMS = {
    "gaussian": "Gaussian noise added to the clipped sum",
    "skellam": "distributed Skellam noise added by the clients under secure aggregation (no "
    "amplification by sampling claimed)",
}
