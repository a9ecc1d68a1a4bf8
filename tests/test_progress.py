"""Progress output: bars on a terminal, plain lines as the work advances when stderr is redirected."""

from puzzle import progress


def test_redirected_progress_is_lines_as_the_work_advances(monkeypatch, capsys):
    monkeypatch.setenv("PUZZLE_QUIET", "0")
    monkeypatch.setattr(progress, "_console", progress.Console(stderr=True))  # capsys' stderr: not a terminal
    with progress.track("work", 20) as bar:
        for step in range(20):
            bar.advance(1, loss=1.0 / (step + 1))
            if step == 4:
                assert capsys.readouterr().err.splitlines() == ["work: 2/20 (0 s) loss=0.5", "work: 4/20 (0 s) loss=0.25"]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"work: {k}/20" for k in range(6, 21, 2)]
    with progress.track("open-ended", None) as bar:
        bar.advance(3)
    assert capsys.readouterr().err.splitlines() == ["open-ended: 3 (0 s)"]
