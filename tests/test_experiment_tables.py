"""experiments/privacy_record_table.py: the record-level DP table (docs/results/privacy-record.md)
is computed from the sweeps' sweep.csv files alone. Oracle: shares worked out by hand from the rows written here."""

from __future__ import annotations

import pytest

from tests.experiment_scripts import load_experiment

HEADER = "strategy,epsilon_target,seed,final_accuracy,best_accuracy,epsilon_spent,run_dir\n"


def test_kept_share_uses_each_seed_and_the_reference_given(tmp_path):
    # Prepare: two seeds at epsilon 8, a no-DP file that also holds a DP row to be ignored
    table = load_experiment("privacy_record_table")
    sweep = tmp_path / "sweep.csv"
    sweep.write_text(HEADER + "ffa,8.0,0,0.6,0.6,7.9,a\nffa,8.0,1,0.55,0.55,7.9,b\n"
                     "ffa,inf,0,0.7,0.7,,c\nffa,inf,1,0.7,0.7,,d\n")
    no_dp = tmp_path / "adamw.csv"
    no_dp.write_text(HEADER + "ffa,8.0,0,0.3,0.3,7.9,e\nffa,inf,0,0.75,0.75,,f\n")

    # Execute
    found = table.final_accuracies([sweep])
    reference = table.final_accuracies([no_dp], only_epsilon="inf")
    against_better = table.kept_cell(found[("ffa", "8.0")], 0.75, 0.25)
    against_own = table.kept_cell(found[("ffa", "8.0")], 0.7, 0.25)

    # Assert: (0.575 - 0.25) / (0.75 - 0.25) = 65 %, seeds 70 % and 60 %; own: 0.325 / 0.45
    assert reference == {("ffa", "inf"): {"0": 0.75}}
    assert against_better == "65% (seeds 70%, 60%)"
    assert against_own == "72% (seeds 78%, 67%)"
    assert table.cell(found[("ffa", "8.0")]) == "0.575 ± 0.035"
    assert table.cell(reference[("ffa", "inf")]) == "0.750 (1 seed)"
    assert table.kept_cell({}, 0.75, 0.25) == "–"
    assert table.kept_share(0.25, 0.75, 0.25) == pytest.approx(0.0)
