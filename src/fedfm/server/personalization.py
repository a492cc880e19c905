"""Scoring personalized federated fine-tuning on each client's own held-out data.

Every client that holds a local test split (``data.client_test_fraction``) is scored with the
global model and, under ``personalization.method``, with its personal model (the global state
with its own personal tensors in place; a client that never trained starts from the global
ones). With ``personalization.finetune_steps``, after the last round each client also fine-tunes
that many steps on its own training rows from its model (local fine-tuning after FL) and is
scored again. Scores are summarised as mean, standard deviation and worst-10% mean (the worst
clients: lowest accuracy, highest perplexity). In a deployment the personal tensors stay on the
clients, so the server scores only the global model.
"""

from __future__ import annotations

from fedfm.algorithms.personal import PERSONAL_PARTS, client_start, personalizes
from fedfm.models.state import set_trainable_state
from fedfm.server.parts import RunParts
from fedfm.tasks.metrics import summarize


def task_metric(task_kind: str) -> tuple[str, bool]:
    """(metric, higher is better) a client's own score uses (the task kind's ``own_metric``)."""
    from fedfm.tasks import TASKS

    return TASKS.get(task_kind).own_metric


def active(cfg) -> bool:
    """Whether clients are scored on their own data: a personalization method, or fine-tuning."""
    p = cfg.personalization
    return personalizes(p) or p.finetune_steps > 0


def clustered(cfg) -> int:
    """IFCA's number of cluster models, or 0."""
    p = cfg.personalization
    return p.clusters if PERSONAL_PARTS.get(p.method).clustered else 0


def server_params(cfg, stacked, sizes) -> dict:
    """The model the server evaluates and exports as *the* global one: under IFCA, the cluster
    most clients picked in the last round (cluster 0 before any round); else the state itself."""
    from fedfm.algorithms.clusters import cluster_view

    if not clustered(cfg):
        return stacked
    return cluster_view(stacked, largest_cluster(sizes))


def largest_cluster(sizes) -> int:
    """The cluster most clients picked (the lowest index among ties; 0 before any round)."""
    return max(range(len(sizes)), key=lambda j: (sizes[j], -j)) if sizes else 0


def client_cluster(parts: RunParts, params, client_id: int) -> int:
    """IFCA: the cluster client ``client_id`` picks now (its lowest loss on its training rows)."""
    from fedfm.client.program import ClientProgram, pick_cluster
    from fedfm.types import RoundContext

    spec = ClientProgram.from_config(parts.cfg).personal
    ctx = RoundContext(round=parts.cfg.run.rounds + 1, seed=parts.cfg.run.seed)
    rows = parts.data.client_train[client_id]
    if not len(rows):  # nothing to score the clusters on: the server's global one
        return largest_cluster(parts.cluster_sizes)
    return pick_cluster(parts.bundle, parts.task, client_id, rows, params, spec, ctx)[0]


def own_params(parts: RunParts, params, client_id: int):
    """The model client ``client_id`` would use: the global one, with its personal tensors (under
    IFCA: the cluster model it picks)."""
    if clustered(parts.cfg):
        from fedfm.algorithms.clusters import cluster_view

        return cluster_view(params, client_cluster(parts, params, client_id))
    if not personalizes(parts.cfg.personalization):
        return params
    return client_start(params, (parts.client_state(client_id) or {}).get("personal"))


def scores_clients(parts: RunParts) -> bool:
    """Whether this process scores clients on their own test splits: a personalization method or
    local fine-tuning is on, the clients' data is here (a simulation), and some client holds a
    test split."""
    return not parts.remote and active(parts.cfg) and any(len(rows) for rows in parts.data.client_test)


def client_scores(parts: RunParts, params) -> dict:
    """The global model's and each personal model's score on every client's own test split."""
    if not scores_clients(parts):
        return {}
    metric, higher = task_metric(parts.cfg.task.kind)
    bundle, task, bs = parts.bundle, parts.task, parts.cfg.eval.batch_size
    clients = [k for k, rows in enumerate(parts.data.client_test) if len(rows)]
    out = {}
    global_view = server_params(parts.cfg, params, parts.cluster_sizes)
    own = {"global": lambda k: global_view}
    if personalizes(parts.cfg.personalization):
        own["personal"] = lambda k: own_params(parts, params, k)
    for name, model_of in own.items():
        scores = []
        for k in clients:
            set_trainable_state(bundle.trainable, model_of(k))
            scores.append(
                task.evaluate(bundle.model, task.train, parts.data.client_test[k], bs, bundle.device)[metric]
            )
        out.update(summarize(scores, f"{name}_local_{metric}", higher))
    if "personal" not in own:  # no personal tensors: each client's model is the global one
        out.update({k.replace("global_", "personal_", 1): v for k, v in out.items()})
    set_trainable_state(bundle.trainable, global_view)
    return out


def finetuned_scores(parts: RunParts, params) -> dict:
    """Local fine-tuning after FL: each client's ``finetune_steps`` from its own model on its own
    training rows, then its score on its own test split; the summary and every client's score."""
    from fedfm.client.program import train_from

    p = parts.cfg.personalization
    if parts.remote or p.finetune_steps == 0:
        return {}
    metric, higher = task_metric(parts.cfg.task.kind)
    bundle, task, bs = parts.bundle, parts.task, parts.cfg.eval.batch_size
    training = parts.cfg.training.model_copy(update={"lr": p.finetune_lr or parts.cfg.training.lr})
    scores = {}
    for k, rows in enumerate(parts.data.client_test):
        if not len(rows) or not len(parts.data.client_train[k]):
            continue
        start = own_params(parts, params, k)
        tuned, _ = train_from(bundle, task, parts.data.client_train[k], start, p.finetune_steps, training,
                              parts.cfg.run.seed, key=k)  # fmt: skip
        set_trainable_state(bundle.trainable, tuned)
        scores[k] = task.evaluate(bundle.model, task.train, rows, bs, bundle.device)[metric]
    set_trainable_state(bundle.trainable, server_params(parts.cfg, params, parts.cluster_sizes))
    return {**summarize(list(scores.values()), f"finetuned_local_{metric}", higher),
            "finetuned_by_client": {str(k): v for k, v in scores.items()}}  # fmt: skip


__all__ = ["PERSONAL_PARTS", "client_scores", "finetuned_scores", "summarize"]
