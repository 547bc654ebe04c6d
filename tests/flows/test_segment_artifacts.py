"""The run report and folder table count segments of long recordings (issue 22)."""

from __future__ import annotations

from flows.artifacts import folder_rows, run_report_markdown, segment_panel
from flows.plots import histogram_png
from tasks.records import FileError, FolderReport, segment_id
from tasks.storage import Store


def _reports() -> list[FolderReport]:
    return [
        FolderReport(folder="book", files=12, lines=12, jsonl="r/book.jsonl", new=12, segments=12,
                     segment_seconds=7200.0, segment_durations=[4.2, 12.5, 27.9] * 4),
        FolderReport(folder="p225", files=3, lines=3, jsonl="r/p225.jsonl", new=3),
    ]


def test_folder_table_counts_segments_and_segmented_hours():
    rows = {r["folder"]: r for r in folder_rows(_reports())}
    assert (rows["book"]["segments"], rows["book"]["segmented_hours"]) == (12, 2.0)
    assert (rows["p225"]["segments"], rows["p225"]["segmented_hours"]) == (0, 0.0)
    plain = folder_rows([_reports()[1]])  # nothing segmented: the table is as before
    assert "segments" not in plain[0]


def test_run_report_says_how_much_was_segmented_and_plots_durations(tmp_path):
    md = run_report_markdown(_reports(), Store(str(tmp_path)), 10.0, None, (), ())
    assert "**12 lines are segments of long recordings** (2.000 segmented hours" in md
    assert "segments of long recordings" not in run_report_markdown(_reports()[1:], Store(str(tmp_path)), 10.0, None, (), ())
    panel = segment_panel(_reports())
    assert panel is not None and sorted(panel.values) == sorted([4.2, 12.5, 27.9] * 4)
    assert histogram_png([panel], columns=1).startswith(b"\x89PNG")
    assert segment_panel(_reports()[1:]) is None


def test_a_long_file_with_failed_segments_is_one_failed_file_in_the_table():
    errors = [FileError(id=segment_id("book/ch01.flac", s, e), stage="transcribe", error="refused")
              for s, e in [(0.3, 20.1), (40.0, 60.5)]]
    report = FolderReport(folder="book", files=2, lines=5, errors=errors, jsonl="r/book.jsonl", new=1, segments=5)
    row = folder_rows([report])[0]
    assert (row["files"], row["new"], row["failed"], row["reused"], row["lines"]) == (2, 1, 1, 0, 5)
