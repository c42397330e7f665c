"""Reports of the arena: one self-contained HTML page and a terminal table from results.json.

    from seqlab.report import write_report, summary_table
    print(summary_table(results))                 # results: the results.json dict, or its path
    write_report(results, "runs/arena/report.html")
"""

from seqlab.report.html import render_html, write_report
from seqlab.report.table import COLUMNS, comparison, summary_table

__all__ = ["COLUMNS", "comparison", "render_html", "summary_table", "write_report"]
