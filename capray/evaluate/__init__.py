"""Evaluation: caption metrics (metrics.py), the attention report (report.py) and the job (job.py)."""

from capray.evaluate.job import evaluate, log_table, report_images, run
from capray.evaluate.metrics import METRICS, NO_JAVA, coco_metrics, coco_metrics_of, java_available, score, score_of
from capray.evaluate.report import ReportItem, attention_figure, upsample, write_report

__all__ = [
    "METRICS",
    "NO_JAVA",
    "ReportItem",
    "attention_figure",
    "coco_metrics",
    "coco_metrics_of",
    "evaluate",
    "java_available",
    "log_table",
    "report_images",
    "run",
    "score",
    "score_of",
    "upsample",
    "write_report",
]
