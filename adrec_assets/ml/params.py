"""Training settings of the learnt models (user space, projector, user refit), declared once.

These dataclasses are the only place a setting, its default and its description live: the
trainers take them, the artifacts record them (``TrainingProvenance.params``), the projector
rebuilds its architecture from them, and the Dagster ``Config`` classes the launchpad shows
are generated from them (``adrec_assets.assets.common.params_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def setting(default: float | int, help: str) -> float | int:  # noqa: A002 - the field's description
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class UserTrainingParams:
    """InfoNCE over co-click pairs; one epoch visits every co-clicked (user, ad) pair once."""

    dim: int = setting(128, "User-space dimension.")
    temperature: float = setting(0.07, "InfoNCE temperature.")
    epochs: int = setting(20, "Passes over the co-clicked pairs (at least).")
    min_steps: int = setting(2000, "Raise the epochs until at least this many optimizer steps run.")
    max_steps: int = setting(
        4000, "Cap the optimizer steps (0 = no cap), but never below one pass: each user's row must be visited."
    )
    batch_size: int = setting(512, "Pairs per step (in-batch negatives).")
    lr: float = setting(3e-3, "SparseAdam learning rate.")
    weight_decay: float = setting(0.0, "L2 penalty on the rows of each batch.")
    seed: int = setting(0, "Seeds init and pair sampling.")


@dataclass(frozen=True)
class ProjectorParams:
    """InfoNCE(ad, its clickers) + centroid_weight x MSE(ad, centroid of its clickers), and the
    architecture of the MLP (hidden width, dropout) and of the score (popularity weight)."""

    hidden_dim: int = setting(512, "Hidden width of the MLP.")
    dropout: float = setting(0.1, "Dropout after the hidden layer.")
    temperature: float = setting(0.07, "InfoNCE temperature.")
    centroid_weight: float = setting(0.1, "Weight of the centroid MSE loss.")
    epochs: int = setting(10, "Passes over the (ad, clicker) pairs (at least).")
    batch_size: int = setting(128, "Pairs per step (in-batch negatives).")
    lr: float = setting(1e-3, "AdamW learning rate.")
    weight_decay: float = setting(0.01, "AdamW weight decay.")
    popularity_weight: float = setting(
        0.25, "Weight of the content-predicted popularity z-score added to the cosine (0 = pure cosine)."
    )
    field_scale: float = setting(
        6.0,
        "Scale of the encoded structured ad fields (ad_fields.json) beside the unit content vector (0 = ignore them).",
    )
    min_steps: int = setting(1500, "Raise the epochs until at least this many optimizer steps run.")
    max_steps: int = setting(4000, "Cap the optimizer steps (0 = no cap): one MLP shared by all ads.")
    seed: int = setting(0, "Seeds init, dropout and sampling.")


@dataclass(frozen=True)
class UserRefitParams:
    """One implicit-ALS user step against the projected ads (``adrec_assets.ml.user_refit``):
    how strongly a click counts, how far the fit is pulled to zero, how much of it is served."""

    alpha: float = setting(5.0, "Confidence of a click: a clicked ad counts 1 + alpha x its click weight.")
    regularization: float = setting(10.0, "L2 penalty (lambda) of the user step.")
    mix: float = setting(
        1.0, "Served vector = normalize(InfoNCE vector + mix x unit refit); 0 serves the InfoNCE vectors unchanged."
    )


@dataclass(frozen=True)
class AdRefitParams:
    """Implicit-ALS ad steps against the served users whose prior mean is the ad's content
    projection, alternated with user steps (``adrec_assets.ml.served_model``): how strongly a
    click counts, how hard an ad is pulled toward its projection, how much of the
    content-predicted popularity it keeps, and how often users and ads alternate."""

    alpha: float = setting(5.0, "Confidence of a click: a clicker counts 1 + alpha x its click weight.")
    regularization: float = setting(
        30.0,
        "Pull (lambda) toward the content projection: an ad with few clicks stays near it, many clicks outweigh it.",
    )
    warm_bias: float = setting(
        0.0, "Share of the content-predicted popularity term an ad with clicks keeps (its clicks carry popularity too)."
    )
    iterations: int = setting(
        0, "Alternations after the first ad step: users refitted to the served ads, then ads to those users (0 = none)."
    )
    user_regularization: float = setting(30.0, "L2 penalty (lambda) of the alternating user steps.")
