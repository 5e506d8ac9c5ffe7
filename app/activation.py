"""Whether a finished job's version replaces the one being served: the job's `activate`
policy (if_better, always, never). `if_better` judges the candidate and the served version
on the same frozen holdout of the candidate's dataset, through the one prediction path at
the served precision, and promotes only a candidate that is better by more than chance
(McNemar's exact test on the per-image results at `alpha`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import ModelCard, load_version
from model.data import DatasetError
from model.device import Placement
from model.evaluation import evaluate_version
from model.stats import PairedResult, paired


@dataclass(frozen=True)
class Decision:
    """`reason` is the decision in words (the job's `activation`); `promotion` the numbers
    behind it (the job's `promotion`)."""

    activate: bool
    reason: str
    promotion: dict[str, Any] = field(default_factory=dict)


def holdout_note(new: ModelCard, current: ModelCard) -> str | None:
    """Why a holdout comparison may not be fair, if it may not."""
    if current.dataset is None:
        return (f"the served version records no dataset (source: {current.source}): the "
                "comparison may favour either side")  # fmt: skip
    if current.dataset != new.dataset:
        return (f"the served version was trained on {current.dataset}, not {new.dataset}: the "
                "comparison may favour either side")  # fmt: skip
    same_data = current.dataset_hash is not None and current.dataset_hash == new.dataset_hash
    if not same_data or current.holdout_hash != new.holdout_hash:
        return ("the served version was trained on other contents or another holdout of this "
                "dataset (or before its holdout was frozen) and may have seen holdout images: "
                "the comparison may favour either side")  # fmt: skip
    return None


def decide(policy: str, new: ModelCard, current: ModelCard | None, *,
           result: PairedResult | None = None, alpha: float = 0.05,
           holdout: dict[str, Any] | None = None) -> Decision:  # fmt: skip
    """The decision for a finished job's version under `policy`; `result`: the paired
    holdout results (candidate vs served) that `if_better` needs."""
    if current is None:
        return Decision(True, "activated: no version was being served")
    if policy == "always":
        return Decision(True, "activated: activate=always")
    if policy == "never":
        return Decision(False, "not activated: activate=never")
    if new.labels != current.labels:
        return Decision(False, f"not activated: its labels differ from the served version "
                               f"{current.version}'s, so there is no comparison; activate it "
                               "explicitly")  # fmt: skip
    if result is None:
        return Decision(False, "not activated: it could not be compared with the served version "
                               f"{current.version} on a holdout")  # fmt: skip
    p = result.p_value
    note = holdout_note(new, current)
    promotion = {
        "policy": policy, "alpha": alpha, "p_value": p, "holdout_size": result.n,
        "candidate": {"version": new.version, "top1": result.candidate_top1},
        "served": {"version": current.version, "top1": result.other_top1},
        "only_candidate_right": result.b, "only_served_right": result.c,
        **(holdout or {}), "note": note,
    }  # fmt: skip
    nums = (f"holdout top-1 {result.candidate_top1:.4f} vs {result.other_top1:.4f} of the "
            f"served version {current.version} on {result.n} images of "
            f"{(holdout or {}).get('dataset', new.dataset)}'s holdout; McNemar exact "
            f"p={p:.4g}")  # fmt: skip
    if result.candidate_top1 > result.other_top1 and p < alpha:
        text = f"activated: {nums} < {alpha:g}"
        yes = True
    elif result.candidate_top1 > result.other_top1:
        text = f"not activated: better, but not by more than chance: {nums} >= {alpha:g}"
        yes = False
    else:
        text = f"not activated: not better: {nums}"
        yes = False
    if note:
        text += f" (note: {note})"
    promotion["decision"] = "activated" if yes else "not_activated"
    return Decision(yes, text, promotion)


def judge(new: ModelCard, current: ModelCard, *, models_dir: Path, data_dir: Path,
          placement: Placement, holdout_share: float,
          channels_last: bool = True) -> tuple[PairedResult, dict[str, Any]]:  # fmt: skip
    """Both versions on the candidate's dataset's holdout, image by image (blocking: run it
    in a thread). Each is preprocessed as its own card says, at `placement` (the served
    device and precision). Raises DatasetError or CheckpointError."""
    if new.dataset is None:
        raise DatasetError(f"version {new.version} records no dataset to judge it on")
    reports = []
    for card in (new, current):
        net, card = load_version(models_dir / card.version)
        reports.append(evaluate_version(net, card, new.dataset, split="holdout",
                                        data_dir=data_dir, placement=placement,
                                        channels_last=channels_last, per_item=True,
                                        holdout_share=holdout_share, split_of=new))  # fmt: skip
    a, b = (r.result.correct or [] for r in reports)
    holdout = {"dataset": new.dataset, "dataset_hash": new.dataset_hash,
               "holdout_hash": new.holdout_hash, "precision": placement.precision}  # fmt: skip
    return paired(a, b), holdout


def should_activate(
    policy: str, new: ModelCard, current: ModelCard | None, **kw: Any
) -> tuple[bool, str]:
    """(activate?, why): `decide` without the numbers."""
    d = decide(policy, new, current, **kw)
    return d.activate, d.reason
