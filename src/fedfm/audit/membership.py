"""Membership inference on the final global model: was this example in some client's data?

Two attacks with the same members and non-members:

- **loss threshold** (Yeom et al. 2018): score = −loss under the final model; members were
  trained on, so their loss tends to be lower;
- **reference-calibrated** (the offline form of Carlini et al.'s LiRA and of Watson et al. 2022):
  score = loss under a reference model − loss under the final model, which takes out how hard an
  example is by itself. The reference model is the run's starting model trained, with the run's
  own training settings, on reference data the attacker holds.

Members: rows of the clients' training data. Non-members and reference data: the two halves of
the server's test split (disjoint from each other and from every client's data; the test split's
rows were never trained on). Reported: AUC and the TPR at 1% FPR (Carlini et al. 2022).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.audit.scores import auc, tpr_at_fpr
from fedfm.models.state import set_trainable_state
from fedfm.seeding import numpy_rng
from fedfm.types import Params


@torch.no_grad()
def example_losses(bundle, task, data, rows, batch_size: int = 32) -> np.ndarray:
    """Each row's loss under the model as it is (eval mode): cross-entropy for a classifier, the
    mean reply-token NLL for instruction tuning."""
    from fedfm.tasks.instruction import token_nll

    model = bundle.model
    was = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            part = np.asarray(rows[start : start + batch_size])
            batch = (
                task.eval_batch(data, part, bundle.device)
                if hasattr(task, "eval_batch")
                else task.batch(data, part, bundle.device)
            )
            if hasattr(task, "logits"):
                losses = F.cross_entropy(task.logits(model, batch).float(), batch["labels"], reduction="none")
            else:
                nll, count = token_nll(model, batch)
                losses = nll / count.clamp(min=1)
            out.append(losses.cpu().double().numpy())
    finally:
        model.train(was)
    return np.concatenate(out) if out else np.array([])


def split_rows(data, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(members from the clients' training rows, non-members, reference rows): the test split
    halved at random, members drawn to the non-members' number; at most ``limit`` each."""
    rng = numpy_rng(seed, "membership")
    test = rng.permutation(len(data.test))
    half = len(test) // 2
    nonmembers, reference = test[:half][:limit], test[half:]
    trained = np.unique(np.concatenate([np.asarray(r) for r in data.client_train if len(r)]))
    trained = trained[trained < data.num_real]  # synthetic rows are no one's data
    members = rng.choice(trained, size=min(len(trained), len(nonmembers)), replace=False)
    return members, nonmembers, reference


def attack_scores(member_losses, nonmember_losses, member_ref=None, nonmember_ref=None) -> dict:
    """AUC and TPR at 1% FPR of the loss attack and (with reference losses) the calibrated one."""
    out = {
        "loss_auc": auc(-np.asarray(member_losses), -np.asarray(nonmember_losses)),
        "loss_tpr_at_1pct_fpr": tpr_at_fpr(-np.asarray(member_losses), -np.asarray(nonmember_losses), 0.01),
    }
    if member_ref is not None:
        m = np.asarray(member_ref) - np.asarray(member_losses)
        n = np.asarray(nonmember_ref) - np.asarray(nonmember_losses)
        out["calibrated_auc"] = auc(m, n)
        out["calibrated_tpr_at_1pct_fpr"] = tpr_at_fpr(m, n, 0.01)
    return out


def membership_audit(
    bundle, task, reference_task, data, final: Params, start: Params, training,
    seed: int = 0, limit: int = 500, reference_steps: int = 100,
) -> dict:  # fmt: skip
    """The two attacks on the final model ``final``; ``reference_task``: the task built over the
    test split as training data (so the reference model trains on its half); ``start``: the
    model the run began from."""
    from fedfm.client.program import train_from

    members, nonmembers, reference = split_rows(data, limit, seed)
    if len(members) < 10 or len(nonmembers) < 10:
        raise ValueError(
            f"membership inference needs at least 10 members and 10 non-members "
            f"(have {len(members)} and {len(nonmembers)}): give the server a larger test split"
        )
    set_trainable_state(bundle.trainable, final)
    m_loss = example_losses(bundle, task, task.train, members)
    n_loss = example_losses(bundle, task, task.test, nonmembers)
    ref_params, _ = train_from(bundle, reference_task, reference, start, reference_steps, training, seed)
    set_trainable_state(bundle.trainable, ref_params)
    m_ref = example_losses(bundle, task, task.train, members)
    n_ref = example_losses(bundle, task, task.test, nonmembers)
    set_trainable_state(bundle.trainable, final)
    return {
        "members": int(len(members)),
        "nonmembers": int(len(nonmembers)),
        "reference_rows": int(len(reference)),
        "reference_steps": reference_steps,
        "member_loss_mean": float(m_loss.mean()),
        "nonmember_loss_mean": float(n_loss.mean()),
        **attack_scores(m_loss, n_loss, m_ref, n_ref),
    }
