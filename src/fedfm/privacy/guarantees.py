"""What each privacy.dp setting guarantees, in words (no dependency: the report needs it)."""

GUARANTEES = {
    "none": "none: no differential privacy",
    "client": "client-level (ε, δ)-DP: any one client's whole data changes the released models little",
    "example": "example-level (ε, δ)-DP per client (DP-SGD): one training example changes its client's "
    "updates little; clients as a whole are not protected",
}
