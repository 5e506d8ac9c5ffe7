"""Whether a finished job's version replaces the one being served: the job's `activate`
policy (if_better, always, never). `if_better` judges the candidate and the served version
on the same frozen holdout of the candidate's dataset, through the one prediction path at
the served precision, and promotes only a candidate that is better by more than chance
(McNemar's exact test on the per-image results at `alpha`)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.feedback import FeedbackStore, snapshot_dir
from model.checkpoint import ModelCard, load_version
from model.data import DatasetError
from model.device import Placement
from model.evaluation import evaluate_version
from model.stats import PairedResult, paired, pooled


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
           holdout: dict[str, Any] | None = None,
           feedback: PairedResult | None = None,
           served_data: tuple[PairedResult, str] | None = None) -> Decision:  # fmt: skip
    """The decision for a finished job's version under `policy`. `if_better` needs paired
    results (candidate vs served): `result` on the dataset's frozen holdout, `feedback` on
    the feedback holdout (labelled traffic no version trained on); either or both. With
    both, each is reported and the decision is one McNemar test on the two together (they
    are disjoint images), refused if the candidate is worse by more than chance on either.
    `served_data`: a job on feedback alone has no dataset holdout of its own; the served
    version's dataset's holdout is then reported (a sign of forgetting), not decided on:
    the labels users gave may contradict that dataset's."""
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
    results = {k: r for k, r in (("dataset", result), ("feedback", feedback)) if r is not None}
    if not results:
        return Decision(False, "not activated: it could not be compared with the served version "
                               f"{current.version} on a holdout")  # fmt: skip
    both = pooled(list(results.values()))
    p = both.p_value
    note = holdout_note(new, current) if result is not None else None
    where = {"dataset": f"{(holdout or {}).get('dataset', new.dataset)}'s holdout",
             "feedback": "the feedback holdout (labelled traffic)"}  # fmt: skip
    promotion = {
        "policy": policy, "alpha": alpha, "p_value": p, "holdout_size": both.n,
        "candidate": {"version": new.version, "top1": both.candidate_top1},
        "served": {"version": current.version, "top1": both.other_top1},
        "only_candidate_right": both.b, "only_served_right": both.c,
        **(holdout or {}), "note": note,
        "holdouts": {k: {"size": r.n, "candidate_top1": r.candidate_top1,
                         "served_top1": r.other_top1, "only_candidate_right": r.b,
                         "only_served_right": r.c, "p_value": r.p_value}
                     for k, r in results.items()},
    }  # fmt: skip
    parts = [f"holdout top-1 {r.candidate_top1:.4f} vs {r.other_top1:.4f} of the served "
             f"version {current.version} on {r.n} images of {where[k]}"
             for k, r in results.items()]  # fmt: skip
    if len(results) == 1:
        nums = f"{parts[0]}; McNemar exact p={p:.4g}"
    else:
        nums = "; ".join(parts) + f"; McNemar exact p={p:.4g} on both together"
    if served_data is not None:
        r, spec = served_data
        promotion["holdouts"]["served_dataset"] = {
            "dataset": spec, "decided_on": False, "size": r.n, "candidate_top1": r.candidate_top1,
            "served_top1": r.other_top1, "only_candidate_right": r.b, "only_served_right": r.c,
            "p_value": r.p_value}  # fmt: skip
        nums += (
            f" (reported, not decided on: {r.candidate_top1:.4f} vs {r.other_top1:.4f} "
            f"on {r.n} images of the served version's dataset {spec}'s holdout)"
        )
    worse = [k for k, r in results.items() if r.other_top1 > r.candidate_top1 and r.p_value < alpha]
    if worse:
        text = f"not activated: worse by more than chance on {where[worse[0]]}: {nums}"
        yes = False
    elif both.candidate_top1 > both.other_top1 and p < alpha:
        text = f"activated: {nums} < {alpha:g}"
        yes = True
    elif both.candidate_top1 > both.other_top1:
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
          placement: Placement, holdout_share: float, channels_last: bool = True,
          of: ModelCard | None = None) -> tuple[PairedResult, dict[str, Any]]:  # fmt: skip
    """Both versions on the holdout of `of`'s dataset (default: the candidate's), image by
    image (blocking: run it in a thread). Each is preprocessed as its own card says, at
    `placement` (the served device and precision). Raises DatasetError or CheckpointError."""
    ref = of or new
    if ref.dataset is None:
        raise DatasetError(f"version {ref.version} records no dataset to judge it on")
    reports = []
    for card in (new, current):
        net, card = load_version(models_dir / card.version)
        reports.append(evaluate_version(net, card, ref.dataset, split="holdout",
                                        data_dir=data_dir, placement=placement,
                                        channels_last=channels_last, per_item=True,
                                        holdout_share=holdout_share, split_of=ref))  # fmt: skip
    a, b = (r.result.correct or [] for r in reports)
    holdout = {"dataset": ref.dataset, "dataset_hash": ref.dataset_hash,
               "holdout_hash": ref.holdout_hash, "precision": placement.precision}  # fmt: skip
    return paired(a, b), holdout


def judge_feedback(new: ModelCard, current: ModelCard, store: FeedbackStore, *, models_dir: Path,
                   data_dir: Path, name: str, placement: Placement,
                   channels_last: bool = True) -> PairedResult | None:  # fmt: skip
    """Both versions on the feedback holdout as it is now (labelled answers whose label is
    one of the versions' labels, assigned to the holdout at their first labelling), image by
    image; None when it is empty. Blocking: run it in a thread."""
    dest = snapshot_dir(data_dir, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        man = store.snapshot(dest, list(new.labels), splits=("holdout",))
        if not man.images:
            return None
        hits = []
        for card in (new, current):
            net, card = load_version(models_dir / card.version)
            report = evaluate_version(net, card, f"feedback:{name}", split="holdout",
                                      data_dir=data_dir, placement=placement,
                                      channels_last=channels_last, per_item=True)  # fmt: skip
            hits.append(report.result.correct or [])
        return paired(hits[0], hits[1])
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def should_activate(
    policy: str, new: ModelCard, current: ModelCard | None, **kw: Any
) -> tuple[bool, str]:
    """(activate?, why): `decide` without the numbers."""
    d = decide(policy, new, current, **kw)
    return d.activate, d.reason
