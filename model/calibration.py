"""Temperature scaling (Guo et al., 2017): one scalar T for a version, probabilities =
softmax(logits / T). T is fitted on the validation split (the early-stopping split, which
the weights were never trained on) by minimising the NLL with L-BFGS over log T on cached
logits, and what it achieved is measured on the dataset's frozen holdout, which neither
the weights nor T saw.

Dividing every logit by the same T > 0 never changes the ranking, so top-1 and top-5 are
the same with and without calibration; only how much a probability can be trusted moves.

Expected calibration error (ECE): the test images split into `BINS` equal-width bins of
top-1 probability; ECE = sum over bins of (bin size / n) * |accuracy - mean confidence|.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import torch
import torch.nn.functional as F

BINS: Final = 15
T_MIN, T_MAX = 0.05, 20.0  # a fitted T outside this is a sign of too little data


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, steps: int = 50) -> float:
    """The T > 0 that minimises mean NLL of softmax(logits / T) on (logits, labels).

    Optimised over log T (positive by construction, and the NLL is smooth in it) with
    L-BFGS and a strong-Wolfe line search: a one-parameter problem that converges in a few
    iterations. Clamped to [T_MIN, T_MAX]."""
    logits, labels = logits.detach().double(), labels.detach().long()
    if logits.numel() == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, T_MIN), T_MAX)


MIN_FIT: Final = 20  # validation images below which no temperature is fitted


def checked_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, str | None]:
    """The temperature to use, and why it is 1 when it is.

    T is fitted on the whole validation split, but only kept when it also helps on data it
    was not fitted on: fitted on each half (alternate images), it must lower the summed NLL
    of the other half against T = 1. A split with almost no mistakes makes the fit sharpen
    without bound (every confident answer was right), which then costs dearly on the first
    mistake elsewhere; this catches that without touching the holdout."""
    n = int(labels.numel())
    if n < MIN_FIT:
        return 1.0, f"only {n} validation images (< {MIN_FIT}): no temperature fitted"
    halves = (torch.arange(0, n, 2), torch.arange(1, n, 2))
    gain = 0.0
    for fit_on, test_on in (halves, halves[::-1]):
        t = fit_temperature(logits[fit_on], labels[fit_on])
        gain += nll(logits[test_on], labels[test_on]) - nll(logits[test_on], labels[test_on], t)
    if gain <= 0:
        return 1.0, ("a temperature fitted on half of the validation split made the other half "
                     "worse (too few mistakes there to fit one): kept T = 1")  # fmt: skip
    return fit_temperature(logits, labels), None


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / T)."""
    if logits.numel() == 0:
        return float("nan")
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


@dataclass(frozen=True)
class Reliability:
    """Per bin (equal width over [0, 1]): images, mean top-1 probability, accuracy."""

    counts: list[int]
    confidence: list[float]
    accuracy: list[float]

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def ece(self) -> float:
        n = self.n
        if n == 0:
            return float("nan")
        return sum(c / n * abs(a - p) for c, p, a in
                   zip(self.counts, self.confidence, self.accuracy, strict=True) if c)  # fmt: skip


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> Reliability:
    """Bin the top-1 probability of each row of `probs` (N, C). A probability of exactly
    k / bins falls in bin k - 1 (bins are (lo, hi], the first also takes 0)."""
    conf, pred = probs.double().max(dim=1)
    hit = pred.eq(labels.long()).double()
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    counts = torch.bincount(idx, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, hit)
    safe = counts.clamp(min=1).double()
    return Reliability(counts.tolist(), (conf_sum / safe).tolist(), (hit_sum / safe).tolist())


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """Expected calibration error of `probs` (N, C) against `labels` (N,)."""
    return reliability(probs, labels, bins).ece


@dataclass(frozen=True)
class Calibration:
    """What model.json's `calibration` holds: the temperature and, on `n` holdout images,
    ECE and NLL before (T = 1) and after."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    bins: int
    n: int
    fitted_on: str  # which split T was fitted on ("val")
    fitted_n: int
    measured_on: str  # where the numbers come from ("holdout", or "val" without one)
    before: Reliability
    after: Reliability
    note: str | None = None  # why T is 1, when no fitted temperature was kept

    def card(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return round(x, 6) if math.isfinite(x) else None

        return {"temperature": round(self.temperature, 6), "ece_before": num(self.ece_before),
                "ece_after": num(self.ece_after), "nll_before": num(self.nll_before),
                "nll_after": num(self.nll_after), "bins": self.bins, "n": self.n,
                "fitted_on": self.fitted_on, "fitted_n": self.fitted_n,
                "measured_on": self.measured_on,
                **({"note": self.note} if self.note else {})}  # fmt: skip


def calibrate(fit: tuple[torch.Tensor, torch.Tensor],
              measure: tuple[torch.Tensor, torch.Tensor] | None, *,
              bins: int = BINS) -> Calibration:  # fmt: skip
    """Fit T on `fit` (logits, labels; `checked_temperature`) and measure before/after on
    `measure` (the holdout; the fit split itself when there is none, which the card then
    says)."""
    t, note = checked_temperature(*fit)
    where = "holdout" if measure is not None and measure[0].shape[0] else "val"
    logits, labels = measure if where == "holdout" and measure is not None else fit
    before = reliability(F.softmax(logits.double(), dim=1), labels, bins)
    after = reliability(F.softmax(logits.double() / t, dim=1), labels, bins)
    return Calibration(t, before.ece, after.ece, nll(logits, labels), nll(logits, labels, t),
                       bins, int(labels.numel()), "val", int(fit[1].numel()), where,
                       before, after, note)  # fmt: skip


def collect_logits(model: torch.nn.Module,
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Float32 logits (N, C) and labels (N,) on the CPU, through the one forward path."""
    from model.engine import forward_logits

    outs, ys = [], []
    model.eval()
    with torch.inference_mode():
        for x, y in batches:
            outs.append(forward_logits(model, x).cpu())
            ys.append(y.cpu().long())
    if not outs:
        return torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


def reliability_png(cal: Calibration, *, title: str = "Reliability") -> bytes:
    """Before and after side by side: accuracy per confidence bin against the diagonal
    (bar width = the bin), the gap to the bin's mean confidence shaded; empty bins blank."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2), dpi=100)
    width = 1 / cal.bins
    lefts = [i * width for i in range(cal.bins)]
    for k, (rel, name, e) in enumerate(((cal.before, "before (T = 1)", cal.ece_before),
                                        (cal.after, f"after (T = {cal.temperature:.3g})",
                                         cal.ece_after))):  # fmt: skip
        ax = fig.add_subplot(1, 2, k + 1)
        acc = [a if c else 0.0 for a, c in zip(rel.accuracy, rel.counts, strict=True)]
        ax.bar(lefts, acc, width=width, align="edge", edgecolor="black", label="accuracy")
        conf = [p if c else 0.0 for p, c in zip(rel.confidence, rel.counts, strict=True)]
        ax.bar(lefts, [abs(p - a) for p, a in zip(conf, acc, strict=True)], width=width,
               bottom=[min(p, a) for p, a in zip(conf, acc, strict=True)], align="edge",
               color="red", alpha=0.3, label="gap to mean confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 probability")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {100 * e:.1f}%")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{title} ({cal.n} {cal.measured_on} images, {cal.bins} bins)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
