"""Update transforms applied between local training and aggregation (validation first)."""
