"""The server's warm-up on FM-made synthetic rows before round 1 (``synthetic.warmup_steps``)."""

from __future__ import annotations

from fedfm.client.program import train_from


def server_warmup(cfg, bundle, task, rows, params):
    """Train ``params`` on the synthetic ``rows`` for ``synthetic.warmup_steps`` at the server;
    returns (the new trainable state, the mean loss)."""
    sy = cfg.synthetic
    training = cfg.training.model_copy(update={"lr": sy.warmup_lr or cfg.training.lr, "grad_accumulation": 1})
    return train_from(bundle, task, rows, params, sy.warmup_steps, training, cfg.run.seed)
