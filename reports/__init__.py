"""The files a person reads: one record per image (records.py) and predictions.csv, decisions.json, metrics.json,
the figures, report.html, explanations, model cards and studies' tables. Reads the numbers of decisions/."""
