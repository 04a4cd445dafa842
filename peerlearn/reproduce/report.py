"""The markdown report of ``peerlearn reproduce``: a summary table, then one section per
experiment — the setup, every claim with what was measured and its verdict, the figures, and
what the numbers say. Figures are PNGs beside it, in ``reproduction/``.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from peerlearn import __version__
from peerlearn.reproduce.claims import Check, Outcome

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FIGURES", "REPORT", "new_figure", "render", "save_figure"]

#: the report's file name, and its figures' folder beside it
REPORT = "reproduction.md"
FIGURES = "reproduction"


def new_figure(cols: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Figure, list]:  # type: ignore[type-arg]
    """A figure of ``cols`` panels side by side (matplotlib's Agg backend: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, cols, figsize=(width * cols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Figure, folder: Path, name: str) -> str:
    """Write ``fig`` as ``folder/name.png`` and close it; the path the report links."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(folder / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"{FIGURES}/{name}.png"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(c: Check) -> str:
    ratio = "—" if c.ratio is None else f"{c.ratio:.3g}"
    verdict = {"PASS": "**PASS**", "FAIL": "**FAIL**"}.get(c.verdict, "no verdict")
    what = f"{c.quantity} ({c.note})" if c.note else c.quantity
    cells = [what, c.claim.where, c.measured.text(), c.bound_text(), ratio, verdict]
    return "| " + " | ".join(_cell(x) for x in cells) + " |"


def _section(o: Outcome) -> list[str]:
    lines = [
        f"## {o.title}",
        "",
        f"*{o.paper}* — `peerlearn reproduce {o.name}`, {o.seconds:.0f} s",
    ]
    lines += ["", f"**Setup.** {o.setup}", "", "**The claims.**", ""]
    claims = list(dict.fromkeys(c.claim for c in o.checks))
    lines += [f"- **{c.where}** ({c.paper}): {c.statement}" for c in claims]
    lines += [
        "",
        "| quantity | claim | measured: mean [95 % interval] | bound | measured/bound | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_row(c) for c in o.checks]
    for fig in o.figures:
        lines += ["", f"![{o.title}]({fig})"]
    if o.findings:
        lines += ["", o.findings.strip()]
    return [*lines, ""]


def render(outcomes: Sequence[Outcome], seconds: float, command: str) -> str:
    """The whole report for ``outcomes``, rebuilt by ``command`` in ``seconds``."""
    quick = any(o.quick for o in outcomes)
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    total = sum(len(o.checks) for o in outcomes)
    passed = sum(c.verdict == "PASS" for o in outcomes for c in o.checks)
    failed = sum(c.verdict == "FAIL" for o in outcomes for c in o.checks)
    lines = [
        "# The papers' results, reproduced",
        "",
        "Each section below takes one result of the four papers peerlearn implements, states it "
        "as the paper does (the bound, or the figure, with its section), runs it on peerlearn's "
        "simulator or analysis code over several seeds, and gives the verdict: a claim passes when "
        "the 95 % interval of the measured quantity over seeds (Student's t) lies within the bound "
        "— or overlaps the exact value, for a closed form. Where the paper states no bound the "
        "comparison is shown without a verdict. measured/bound shows how close a bound comes: "
        "each bound is also run on an instance where it is nearly tight, where the paper allows "
        "one.",
        "",
        f"Rebuilt by `{command}` in {seconds / 60:.1f} minutes on {when} (peerlearn "
        f"{__version__}, Python {platform.python_version()}, {platform.machine()})"
        + (
            " — a **quick** run: fewer seeds and shorter runs than the committed report."
            if quick
            else "."
        ),
        "",
        f"**{passed} of {total} claims pass, {failed} fail**; "
        f"{total - passed - failed} comparisons carry no verdict.",
        "",
        "A note on chance: a claim that the measured value *equals* a closed form passes when "
        "its 95 % interval holds the exact value, so about 1 in 20 such checks of a correct "
        "claim fails by chance. The seeds are fixed: a rebuild gives the same numbers and "
        "verdicts; a failing 'equals' row is a prompt to rerun it with more seeds, not yet "
        "proof of a bug.",
        "",
        "| experiment | paper | claims | pass | fail | time |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        n = len(o.checks)
        ok = sum(c.verdict == "PASS" for c in o.checks)
        anchor = o.title.lower().replace(" ", "-")
        lines.append(
            f"| [{_cell(o.title)}](#{''.join(ch for ch in anchor if ch.isalnum() or ch in '-_')}) "
            f"| {o.paper} | {n} | {ok} | {len(o.failed)} | {o.seconds:.0f} s |"
        )
    lines.append("")
    for o in outcomes:
        lines += _section(o)
    return "\n".join(lines)
