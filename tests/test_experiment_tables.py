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


def test_heterogeneous_table_groups_settings_and_averages_tiers_over_seeds():
    # Prepare: two seeds of FLoRA with client_ranks, one of FedIT at rank 16, one unfinished run
    table = load_experiment("heterogeneous_table")
    runs = [{"run": f"runs/default-ranks/flora-seed{s}", "finished": "1", "strategy": "flora",
             "seed": str(s), "primary_metric": "accuracy", "final_accuracy": str(0.6 + 0.1 * s),
             "best_accuracy": str(0.7 + 0.1 * s), "bytes_up_total": "2000000",
             "bytes_down_total": str(4000000 * (s + 1))} for s in (0, 1)]
    runs += [{"run": "runs/default-r16/fedavg-seed0", "finished": "1", "strategy": "fedavg",
              "seed": "0", "primary_metric": "accuracy", "final_accuracy": "0.5",
              "best_accuracy": "0.55", "bytes_up_total": "1000000", "bytes_down_total": "1000000"},
             {"run": "runs/default-r2/fedavg-seed0", "finished": "0", "strategy": "fedavg"}]
    rounds = [{"run": f"runs/default-ranks/flora-seed{s}", "round": "25",
               "tiers": '{"2": {"accuracy": %s}, "16": {"accuracy": 0.7}}' % (0.4 + 0.2 * s)}
              for s in (0, 1)] + [{"run": "runs/default-r16/fedavg-seed0", "round": "25", "tiers": ""}]

    # Execute
    rows = table.summarise(runs, rounds)

    # Assert: one row per (setting, method), the unfinished run left out; means by hand
    assert [(r["setting"], r["strategy"], r["n"]) for r in rows] == [
        ("default-r16", "fedavg", 1), ("default-ranks", "flora", 2)]
    flora = rows[1]
    assert flora["final_mean"] == pytest.approx(0.65) and flora["final_std"] == pytest.approx(0.0707, abs=1e-4)
    assert (flora["final_min"], flora["final_max"]) == pytest.approx((0.6, 0.7))
    assert flora["best_mean"] == pytest.approx(0.75)
    assert flora["tiers"] == '{"2": 0.5, "16": 0.7}'
    assert (flora["bytes_up_mb"], flora["bytes_down_mb"]) == pytest.approx((2.0, 6.0))
    assert "| default-ranks | flora | 0 1 | 0.650 ± 0.071 (0.600–0.700) | 0.750 | 0.500 |" \
        in table.markdown(rows)


def test_round_time_recovers_a_known_cost_split_from_the_busiest_host(tmp_path):
    """A synthetic hosted run whose round r takes exactly 0.5 s per client on its busiest host
    plus 1.25 s: the fit gives back both numbers, the imbalance and the floor, written out
    from the same rule by hand."""
    import json

    round_time = load_experiment("bench/round_time")
    hosts, per_round, rounds = 2, 4, 6
    # partitions 0..7; host = p mod 2. Busiest host per training round: 2, 3, 4, 2, 3, 3
    sampled = [[0, 1, 2, 3], [0, 2, 4, 1], [0, 2, 4, 6], [1, 3, 0, 2], [1, 3, 5, 0],
               [2, 4, 6, 7]]
    busiest = [max(sum(p % hosts == h for p in s) for h in range(hosts)) for s in sampled]
    assert busiest == [2, 3, 4, 2, 3, 3]
    (tmp_path / "config.yaml").write_text(
        f"client_batch: 2\nclients_per_round: {per_round}\nclient_hosts: null\n")
    with open(tmp_path / "participation.csv", "w") as handle:
        handle.write("round," + ",".join(f"c{p}" for p in range(8)) + "\n")
        for r, s in enumerate(sampled):
            handle.write(f"{r}," + ",".join("1" if p in s else "0" for p in range(8)) + "\n")
    clock, rows = 7.0, [{"round": 0, "wall_s": 7.0}]
    for r in range(1, rounds + 1):
        clock += 0.5 * busiest[r - 1] + 1.25
        rows.append({"round": r, "wall_s": clock})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    a = round_time.analyse(tmp_path)
    assert a["hosts"] == 2 and a["rounds"] == 6
    assert abs(a["per_client_s"] - 0.5) < 1e-9 and abs(a["per_round_s"] - 1.25) < 1e-9
    assert abs(a["mean_busiest"] - 17 / 6) < 1e-12 and a["balanced_busiest"] == 2
    assert abs(a["imbalance_s"] - 0.5 * (17 - 12)) < 1e-9
    assert abs(a["floor_s"] - (7.0 + 0.5 * 2 * 6)) < 1e-9
