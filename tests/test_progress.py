"""Progress without a terminal: a heartbeat line for a phase stuck in one step, one final line per completed phase."""

from __future__ import annotations

import io
import time

import pytest

from vitqtool.progress import PlainProgress, phase, progress_bar


def test_completed_task_prints_its_final_line_once_and_finish_prints_only_the_unfinished() -> None:
    stream = io.StringIO()
    bar = PlainProgress((), interval=3600.0, stream=stream)
    done, open_task = bar.add_task("calibration", total=2), bar.add_task("statistics", total=4)
    bar.advance(done)
    assert stream.getvalue() == ""  # within the interval, not complete: no line
    bar.advance(done)
    bar.advance(open_task)
    bar.finish()
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["calibration: 2/2", "statistics: 1/4"]
    assert "eta" not in lines[0] and "elapsed" in lines[1]


def test_heartbeat_prints_a_phase_stuck_in_one_long_step(monkeypatch, capsys) -> None:  # capsys: stderr is no terminal
    monkeypatch.setenv("VITQ_PROGRESS_SECONDS", "0.05")
    with progress_bar(True) as bar:
        with phase(bar, "load model"):
            time.sleep(0.3)  # one step, no updates: only the heartbeat can print
        with phase(bar, "plots", 3) as advance:
            for _ in range(3):
                advance()
    lines = capsys.readouterr().err.splitlines()
    stuck = [line for line in lines if line.startswith("load model: 0,")]
    assert len(stuck) >= 2 and all("elapsed" in line for line in stuck)
    assert lines.count(next(line for line in lines if line.startswith("load model: 1/1"))) == 1  # completed once
    assert any(line.startswith("plots: 3/3") for line in lines)


def test_disabled_phase_is_silent(capsys) -> None:
    with progress_bar(False) as bar, phase(bar, "anything", 2) as advance:
        advance()
        advance()
    assert bar is None and capsys.readouterr().err == ""


def test_failed_phase_is_not_marked_complete() -> None:
    stream = io.StringIO()
    bar = PlainProgress((), interval=3600.0, stream=stream)
    with pytest.raises(RuntimeError), phase(bar, "export (onnx) --verify"):
        raise RuntimeError("boom")
    bar.finish()
    assert stream.getvalue().startswith("export (onnx) --verify: 0,")


def test_a_command_that_fails_early_prints_only_its_error_and_one_that_succeeds_keeps_its_lines(capsys) -> None:
    """Lines of a command's first interval are held: dropped when it fails, written when it succeeds."""
    from vitqtool.progress import held_lines

    with pytest.raises(ValueError), held_lines():
        with progress_bar(True) as bar, phase(bar, "load model"):
            pass
        with progress_bar(True) as bar, phase(bar, "load data"):
            raise ValueError("bad data")
    assert capsys.readouterr().err == ""
    with held_lines():
        with progress_bar(True) as bar, phase(bar, "load model"):
            pass
        assert capsys.readouterr().err == ""  # held for the first interval (30 s by default)
    assert capsys.readouterr().err.startswith("load model: 1/1")
