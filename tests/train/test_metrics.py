"""fmcore.train.metrics on its own: the progress bar, the optional TensorBoard, the summary and the plot
of runs whose records lack something (no finite loss, MFU only with a peak rate)."""

import json
import math
import sys

from fmcore.train import metrics

RECORD = {"step": 1, "loss": 2.5, "lr": 1e-3, "tok_s": 1000.0, "mfu": 12.34, "eta_s": 5.0}


def test_the_progress_bar_shows_the_record_and_counts_the_steps(tmp_path, capsys):
    report = metrics.Reporter(tmp_path, total_steps=4, start_step=0, progress="bar", tensorboard=False)
    report.log(RECORD)
    report.advance(2)
    assert report.bar.n == 2 and "loss 2.5000 | lr 1.00e-03 | 1,000 tok/s | MFU 12.3%" in report.bar.postfix
    report.message("a message")  # above the bar, not through it
    report.close()
    out, err = capsys.readouterr()
    assert out == "a message\n" and "2/4" in err
    assert metrics.read_metrics(tmp_path / "metrics.jsonl") == [RECORD]


def test_auto_progress_prints_plain_lines_when_stderr_is_no_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    report = metrics.Reporter(tmp_path, total_steps=4, start_step=0, progress="auto", tensorboard=False)
    report.log(RECORD)
    report.close()
    assert report.bar is None and capsys.readouterr().out == \
        "step 1/4 | loss 2.5000 | lr 1.00e-03 | 1,000 tok/s | MFU 12.3% | eta 0:05\n"


def test_a_run_without_tensorboard_installed_logs_the_rest(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import raises ImportError
    report = metrics.Reporter(tmp_path, total_steps=4, start_step=0, progress="none", tensorboard=True)
    report.log(RECORD)
    report.close()
    assert report.tb is None and not (tmp_path / "tb").exists()
    assert metrics.read_metrics(tmp_path / "metrics.jsonl") == [RECORD]


def test_non_finite_floats_inside_lists_are_written_as_null():
    assert json.loads(metrics.to_json({"a": [1.0, math.nan], "b": (math.inf, 2)})) == {"a": [1.0, None], "b": [None, 2]}


def test_a_run_without_a_finite_loss_or_an_evaluation_has_no_plot(tmp_path):
    records = [{"step": 1, "loss": None, "loss_avg": None}, {"step": 2, "loss": None, "loss_avg": None}]  # as read
    assert metrics.plot_loss(records, tmp_path / "loss.png", "t") is None and not (tmp_path / "loss.png").exists()
    assert metrics.summary(records, {"steps": 2}) == {"steps": 2}


def test_a_non_finite_evaluation_is_left_out_of_the_best_eval_loss():
    # (written as null: an fp16 evaluation whose logits overflowed)
    records = [{"step": 1, "loss": 3.0, "tok_s": 10.0}, {"step": 1, "eval_loss": None, "eval_ppl": None},
               {"step": 2, "loss": 2.0, "tok_s": 10.0}, {"step": 2, "eval_loss": 2.5, "eval_ppl": 12.2}]
    s = metrics.summary(records, {})
    assert s["best_eval_loss"] == 2.5 and s["eval_loss"] == 2.5
    assert "best_eval_loss" not in metrics.summary(records[:2], {})


def test_the_summary_gives_the_median_mfu_past_the_first_step():
    # (the first step includes warm-up; MFU is logged on a GPU, or with log.peak_tflops set)
    records = [{"step": s, "loss": 3.0, "tok_s": 10.0, "mfu": mfu, "mem_mib": 5.0}
               for s, mfu in ((1, 1.0), (2, 30.0), (3, 40.0), (4, 50.0))]
    assert metrics.summary(records, {})["median_mfu"] == 40.0
    assert "median_mfu" not in metrics.summary([{**r, "mfu": None} for r in records], {})
