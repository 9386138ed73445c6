"""Error analysis, debugging suggestions, figures and the HTML report."""
