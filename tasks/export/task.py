"""End-of-run exports as Prefect task runs: the flow's `export_formats` parameter.

Run in the flow process after the merges (the lines must be final, and a rerun that had nothing to
do starts no cluster), one task run per format so each shows in the UI with its own state and log.
An export resumes like `audio-pipeline export` does: shards whose lines did not change are kept.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from tasks.export import ExportError, ExportReport, export
from tasks.settings import PipelineSettings


@task(name="export", task_run_name="export-{fmt}", cache_policy=NO_CACHE)
def export_results(settings: PipelineSettings, fmt: str) -> ExportReport:
    """Export the results root into `{export_dir}/{fmt}`; the report names the lines left out."""
    logger = get_run_logger()
    out = f"{settings.export_dir().rstrip('/')}/{fmt}"
    return export(settings.results_root, fmt, out, progress=logger.info)


def run_exports(settings: PipelineSettings) -> tuple[dict[str, str], list[str]]:
    """Every format asked for: (format -> directory written, one line per export that failed or
    left lines out). A failed export does not stop the next one."""
    logger = get_run_logger()
    written: dict[str, str] = {}
    problems: list[str] = []
    for fmt in settings.export_formats:
        try:
            report = export_results(settings, fmt)
        except ExportError as e:
            problems.append(f"export {fmt}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 (the lines are written; say what failed, go on)
            problems.append(f"export {fmt}: {type(e).__name__}: {e}")
            continue
        written[fmt] = report.out
        logger.info("exported %d of %d lines as %s into %s (%d shards, %d kept from the last export)",
                    report.samples, report.lines, fmt, report.out, report.shards, report.reused_shards)
        if report.failed:
            first = "; ".join(f"{e.id}: {e.error}" for e in report.errors[:3])
            problems.append(f"export {fmt}: {report.failed} line(s) left out (see {report.out}/export.errors.jsonl): {first}")
    for problem in problems:
        logger.error(problem)
    return written, problems
