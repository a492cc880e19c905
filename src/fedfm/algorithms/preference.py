"""Preference optimisation losses (DPO, IPO) and their metrics, as pure functions of log-probs.

For a prompt x with a chosen reply y_w and a rejected one y_l, a policy π and a reference π_ref:

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
    DPO (Rafailov et al. 2023):  L = −log σ(β·h)
    IPO (Azar et al. 2023):      L = (h − 1/(2β))²

The implicit rewards are r = β·(log π − log π_ref) of each reply; the reward accuracy is the share
of pairs with r_w > r_l and the reward margin the mean of r_w − r_l. Log-probs are sums over the
reply's tokens only (``sequence_logprobs``: labels of −100 mark prompt and padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ log p(token) over each row's labelled tokens (next-token: logits[t] predicts labels[t+1])."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


def preference_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h: how much more the policy than the reference prefers the chosen reply (per pair)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Mean DPO loss −log σ(β·h) over the pairs."""
    h = preference_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * h).mean()


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Mean IPO loss (h − 1/(2β))² over the pairs."""
    h = preference_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return ((h - 1.0 / (2.0 * beta)) ** 2).mean()


def reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    """Reward accuracy (share of pairs with r_w > r_l) and mean reward margin r_w − r_l."""
    r_w = beta * (policy_chosen - ref_chosen)
    r_l = beta * (policy_rejected - ref_rejected)
    return {
        "reward_accuracy": float((r_w > r_l).float().mean()),
        "reward_margin": float((r_w - r_l).mean()),
    }


PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss}
