"""Error analysis, debugging suggestions, figures and the HTML report.

- `analyse(summary, results, data)`: error slices, a categorised evidence card per error, and
  ranked debugging suggestions;
- `render(summary, results, data, analysis, provenance)`: the self-contained HTML report;
- `render_compare(summary_a, summary_b, diff)`: the before/after page of two runs;
- `render_inline(summary, report)`: the run's summary as a block of a notebook;
- `label_issues_csv(rows)`: the likely label mistakes as the run folder's label_issues.csv.

Pure functions of stage results: no file I/O, no model calls.
"""

from mmdiag.reports.analysis import analyse, label_issues_csv
from mmdiag.reports.html import render, render_compare, render_inline

__all__ = ["analyse", "label_issues_csv", "render", "render_compare", "render_inline"]
