"""A static HTML report (Jinja2): images, units and experiment tables, linked both ways.

Opens from disk (``report/index.html``): no server, no scripts, no network — every
picture and stylesheet lives inside the report folder and every link is relative.
"""

from mmn.report.build import ImagePage, Report, UnitPage, metric_tables, render_report

__all__ = ["ImagePage", "Report", "UnitPage", "metric_tables", "render_report"]
