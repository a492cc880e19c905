"""Strategy parts: aggregators (pure), server optimizers (FedOpt), client objectives."""
