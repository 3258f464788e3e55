"""``minilora reproduce``: the committed claims report, its figure, and (slow) a rerun of
--quick against the committed quick report, within the report's stated tolerance."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minilora.cli.main import main
from minilora.lab import claims as C
from minilora.lab import claims_report as R

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "figures" / "claims.json"
QUICK = ROOT / "figures" / "claims_quick.json"
CLAIM_IDS = {
    "parameters",
    "memory",
    "small_r",
    "planted_rank",
    "budget",
    "shared_directions",
    "amplification",
    "zero_init",
    "merged_inference",
}


@pytest.mark.parametrize("path", [FULL, QUICK])
def test_committed_report_has_every_claim_with_a_verdict(path):
    data = json.loads(path.read_text())
    claims = data["claims"]
    assert {c["id"] for c in claims} == CLAIM_IDS
    for c in claims:
        assert c["verdict"] in R.VERDICTS
        assert c["paper"] and c["ours"] and c["why"]
    # the claims are a function of the results stored beside them
    assert R.claims(data["results"]) == claims
    md = path.with_suffix(".md").read_text()
    assert md == R.markdown(claims, data["mode"])


def test_full_report_meets_the_issue_bar_or_says_so():
    """The planted-rank record states the knee and the recovery that were measured."""
    data = json.loads(FULL.read_text())
    single = data["results"]["single"]
    assert len({r["seed"] for r in single["runs"]}) >= 5
    assert {1, 2, 4, 8, 16, 32} <= {r["r"] for r in single["runs"]}
    claim = next(c for c in data["claims"] if c["id"] == "planted_rank")
    knee, recovery = ("Knee holds" in claim["why"], "recovery holds" in claim["why"])
    assert knee != ("Knee fails" in claim["why"])
    assert recovery != ("recovery fails" in claim["why"])
    expected = "reproduced" if knee and recovery else "partly" if knee or recovery else "not"
    assert claim["verdict"] == expected


def test_compare_flags_verdicts_and_numbers():
    old = [{"id": "a", "verdict": "reproduced", "number": 10.0}]
    assert R.compare([{"id": "a", "verdict": "reproduced", "number": 11.0}], old) == []
    assert R.compare([{"id": "a", "verdict": "partly", "number": 10.0}], old)
    assert R.compare([{"id": "a", "verdict": "reproduced", "number": 20.0}], old)
    assert R.compare([{"id": "b", "verdict": "reproduced", "number": 10.0}], old)


def test_figure_titles_come_from_the_records(tmp_path):
    """The figure's title numbers are the JSON's (steps, seeds, k, the shift losses)."""
    pytest.importorskip("matplotlib")
    from minilora.lab.claim_plots import plot_claims

    data = json.loads(FULL.read_text())
    fig = plot_claims(data, tmp_path / "c.png")
    titles = [ax.get_title() for ax in fig.axes]
    runs = data["results"]["single"]["runs"]
    assert f"after {runs[0]['steps']} steps" in titles[0]
    assert f"({len({r['seed'] for r in runs})} seeds" in titles[0]
    s7 = data["results"]["section7"]
    assert f"{s7['base_val_loss']:.2f} → {s7['full_val_loss']:.2f}" in titles[2]


def test_reproduce_refuses_an_unwritable_out_before_running(tmp_path, capsys):
    """--out naming a file: one error line, exit 2, nothing run or written."""
    out = tmp_path / "file"
    out.write_text("keep")
    assert main(["reproduce", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minilora reproduce: error:")
    assert out.read_text() == "keep"


@pytest.mark.slow
def test_quick_rerun_matches_the_committed_quick_report(tmp_path):
    """A code change that breaks a finding changes a verdict or moves a number by more
    than the tolerance (claims_report.TOLERANCE). Minutes on 2 cores."""
    out = tmp_path / "claims"
    subprocess.run(
        [sys.executable, "-m", "minilora.cli.main", "reproduce", "--quick", "--out", str(out)],
        check=True,
        cwd=ROOT,
    )
    new = json.loads((out / "claims_quick.json").read_text())["claims"]
    old = json.loads(QUICK.read_text())["claims"]
    assert R.compare(new, old) == []


def test_planted_run_gives_the_same_numbers_whoever_calls_it():
    """A run pins one BLAS thread itself (the teacher's labels and the KL before
    training included), so a notebook's plain call equals the sweep's, bit for bit."""
    from minilora.basics.blas import limited_threads

    plain = C.planted_run(r=2, steps=30, seed=1)
    with limited_threads(1):
        pinned = C.planted_run(r=2, steps=30, seed=1)
    for key in ("kl0", "kl", "curve"):
        assert plain[key] == pinned[key]
