import math

from skyrl_rl_demo.metrics import MetricsCSV, summarize
from skyrl_rl_demo.plots import moving_average


def rows(rewards):
    return [{"step": i + 1, "reward_mean": r, "exact_rate": r / 2, "sleep_s": 0.001} for i, r in enumerate(rewards)]


def test_summary_compares_the_first_and_last_ten_steps():
    learned = summarize(rows([0.1] * 10 + [0.5] * 5 + [0.25] * 10))
    assert math.isclose(learned["reward_first"], 0.1) and math.isclose(learned["reward_last"], 0.25)
    assert learned["learned"] is True and math.isclose(learned["reward_ratio"], 2.5)
    assert math.isclose(learned["exact_last"], 0.125) and math.isclose(learned["sleep_s_mean"], 0.001)
    flat = summarize(rows([0.3] * 12 + [0.5] * 8))
    assert flat["learned"] is False  # last ten: 0.3 * 2 + 0.5 * 8 -> 0.46 < 0.6
    assert summarize(rows([0.0, 0.5, 1.0]))["learned"] is None  # too short to judge


def test_a_run_that_ends_where_one_fixed_answer_would_has_not_learned():
    # Three digits: always saying one of them earns a third, without reading the prompt.
    collapsed = summarize(rows([0.02] * 10 + [0.33] * 10), fixed_answer_reward=1 / 3)
    assert collapsed["reward_last"] >= 2 * collapsed["reward_first"] and collapsed["learned"] is False
    assert summarize(rows([0.02] * 10 + [0.33] * 10))["learned"] is True  # the doubling alone says yes
    assert summarize(rows([0.01] * 10 + [0.7] * 10), fixed_answer_reward=1 / 3)["learned"] is True
    assert collapsed["failed_test"] == "fixed_answer"
    assert summarize(rows([0.3] * 10 + [0.4] * 10), fixed_answer_reward=1 / 3)["failed_test"] == "doubling"
    assert summarize(rows([0.0] * 20), fixed_answer_reward=1 / 3)["failed_test"] == "doubling"  # 0 is not 2x 0


def test_metrics_csv_header_from_first_row_and_rows_kept(tmp_path):
    csv_file = MetricsCSV(tmp_path / "m.csv")
    csv_file.write({"step": 1, "reward_mean": 0.123456789})
    csv_file.write({"step": 2, "reward_mean": 0.5})
    csv_file.close()
    assert (tmp_path / "m.csv").read_text().splitlines() == ["step,reward_mean", "1,0.123457", "2,0.5"]
    assert csv_file.rows[0]["reward_mean"] == 0.123456789


def test_moving_average_warms_up_over_the_first_window():
    assert moving_average([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
