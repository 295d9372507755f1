"""Reporting: terminal/markdown tables, matplotlib plots, the HTML tree viewer."""
