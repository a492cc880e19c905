"""Personalized federated fine-tuning by personal parameters: which payload tensors stay with
each client, and how a client's start and kept state are made from the global state.

A method names the **personal** tensors (``PERSONAL_PARTS``): they never leave the client, are
never aggregated, and each client trains its own from round to round; the rest is shared and
averaged as usual.

- ``fedsa`` (FedSA-LoRA, Guo et al. 2024): the LoRA ``A`` matrices are shared, the ``B``
  matrices personal (A learns what is common, B what is the client's own).
- ``fedper`` (FedPer, Arivazhagan et al. 2019): the classification head is personal, the body
  (LoRA) shared.
- ``fedrep`` (FedRep, Collins et al. 2021): the head is personal as in FedPer, and each round the
  client first trains its head alone (``personalization.head_steps``, body frozen), then the body
  alone (head frozen) for its local steps.
- ``local`` (local-only training, the baseline every method must beat): every tensor is
  personal, nothing travels and the global state never moves; each client trains its own adapter
  on its own data from round to round.
- ``ifca`` (IFCA, Ghosh et al. 2020): no personal tensors but k global models; each client
  trains the one with the lowest loss on its data (``fedfm.algorithms.clusters``).
- ``ditto`` (Ditto, Li et al. 2021): nothing stays home from the global update; each client also
  keeps a whole personal adapter v_k, trained after its global training for
  ``personalization.personal_steps`` on its loss + λ/2·‖v_k − w‖² (w: the round's global state).

Pure functions of tensors and key names; the client program and the ``personal`` transform
(``fedfm.transforms.personal``) apply them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from pydantic import BaseModel, Field

from fedfm.registry import Registry, bind_options
from fedfm.types import Params

HEAD = re.compile(r"(^|\.)(classifier|score)(\.|$)")  # sequence classifiers' heads (BERT, Llama, ViT)


def nothing(key: str) -> bool:
    return False


def lora_b(key: str) -> bool:
    return ".lora_B." in key or key.endswith(".lora_B")


def head(key: str) -> bool:
    return HEAD.search(key) is not None


def everything(key: str) -> bool:
    return True


@dataclass(frozen=True)
class PersonalMethod:
    """A personalization method and what other parts ask of it. Calling it with a tensor's key
    says whether that tensor is personal (``parts``).

    ``head_first``: each round trains the head alone before the body (FedRep); ``own_copy``: the
    personal state is a whole second adapter trained after the global one (Ditto); ``clustered``:
    k global models, each client trains the best (IFCA); ``needs``: what the run must have,
    ``"lora"`` (LoRA factors to keep) or ``"head"`` (a classification head); ``sends_nothing``:
    every tensor is personal (local training)."""

    parts: Callable[[str], bool] = nothing
    active: bool = True  # False only for "none": no personalization at all
    head_first: bool = False
    own_copy: bool = False
    clustered: bool = False
    needs: str | None = None
    sends_nothing: bool = False

    def __call__(self, key: str) -> bool:
        return self.parts(key)

    @property
    def phases(self) -> bool:
        """Whether a client trains in two phases (head then body; global then personal adapter)."""
        return self.head_first or self.own_copy

    def bound(self, options: Mapping[str, Any]) -> PersonalMethod:
        """This method with its options (keyword-only parameters of ``parts``) set."""
        return replace(self, parts=partial(self.parts, **options)) if options else self


def method_options(section) -> dict[str, Any]:
    """The chosen method's options as ``[personalization]`` sets them."""
    return bind_options(PERSONAL_METHODS.get(section.method).parts, section)


def personalizes(section) -> bool:
    """Whether ``[personalization]`` chooses a method (anything but ``none``)."""
    return PERSONAL_METHODS.get(section.method).active


def personal_method(section) -> PersonalMethod:
    """The method ``[personalization]`` chooses, with its options."""
    return PERSONAL_METHODS.get(section.method).bound(method_options(section))


PERSONAL_METHODS: Registry[PersonalMethod] = Registry("personalization method")
PERSONAL_PARTS = PERSONAL_METHODS  # the name from before methods carried their capabilities
PERSONAL_METHODS.register("none")(PersonalMethod(active=False))
PERSONAL_METHODS.register("fedsa")(PersonalMethod(lora_b, needs="lora"))
PERSONAL_METHODS.register("fedper")(PersonalMethod(head, needs="head"))


class FedRepOptions(BaseModel):
    head_steps: int = Field(2, ge=1, description="Steps of the head alone (body frozen) each round.")


class DittoOptions(BaseModel):
    ditto_lambda: float = Field(
        0.1, ge=0, description="λ of λ/2·‖v − w‖², the pull towards the global state."
    )
    personal_steps: int | None = Field(
        None, ge=1, description="Steps of the personal adapter each round; default: the local steps."
    )


class IfcaOptions(BaseModel):
    clusters: int = Field(2, ge=2, le=32, description="The number of cluster models k.")
    cluster_examples: int = Field(
        64, ge=1, description="Training rows a client scores each cluster model on."
    )


PERSONAL_METHODS.register("fedrep", options=FedRepOptions)(
    PersonalMethod(head, head_first=True, needs="head")
)
PERSONAL_METHODS.register("local")(PersonalMethod(everything, sends_nothing=True))
PERSONAL_METHODS.register("ditto", options=DittoOptions)(
    PersonalMethod(own_copy=True)
)  # a second copy, not a part
PERSONAL_METHODS.register("ifca", options=IfcaOptions)(
    PersonalMethod(clustered=True)
)  # fedfm.algorithms.clusters


@dataclass(frozen=True)
class PersonalSpec:
    """A run's personalization as the client program applies it (picklable)."""

    method: str
    head_steps: int = 0  # fedrep: head-only steps before the body's
    lam: float = 0.0  # ditto: λ of the proximal term towards the global state
    personal_steps: int | None = None  # ditto: steps of the personal adapter (default: the local steps)
    clusters: int = 0  # ifca: the number of cluster models (0: not clustered)
    cluster_examples: int = 64  # ifca: training rows a client scores each cluster model on
    options: tuple = ()  # the method's own options, (name, value) pairs

    @property
    def kind(self) -> PersonalMethod:
        return PERSONAL_METHODS.get(self.method).bound(dict(self.options))

    @property
    def is_personal(self) -> Callable[[str], bool]:
        return self.kind

    @property
    def whole_copy(self) -> bool:
        """Ditto: the personal state is a whole second adapter, not a part of the global one."""
        return self.kind.own_copy


def personal_keys(params: Mapping, is_personal: Callable[[str], bool]) -> list[str]:
    return [k for k in params if is_personal(k)]


def client_start(global_params: Params, personal: Params | None) -> Params:
    """What a client trains from: the global state with its own personal tensors in place (the
    global ones on its first round)."""
    if not personal:
        return dict(global_params)
    return {k: personal.get(k, v) for k, v in global_params.items()}


def kept_personal(start: Params, delta: Params, keys) -> Params:
    """The client's personal tensors after its round: where it started plus what it learnt."""
    return {k: start[k] + delta[k] for k in keys}


def shared_part(delta: Params, is_personal: Callable[[str], bool]) -> Params:
    """The tensors of an update that travel (the personal ones stay)."""
    return {k: v for k, v in delta.items() if not is_personal(k)}


def dense_again(delta: Params, reference: Mapping, is_personal: Callable[[str], bool]) -> Params:
    """A shared update made whole for the aggregate: zeros at the personal tensors (whatever a
    client sent there), so the global state's personal part never moves."""
    import torch

    out = {k: v for k, v in delta.items() if not is_personal(k)}
    out.update({k: torch.zeros_like(v) for k, v in reference.items() if is_personal(k)})
    return out
