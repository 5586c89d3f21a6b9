"""From per-image outputs to what a person reads: metrics and uncertainty curves (uncertainty),
predictions.csv / metrics.json / errors.pt (results), explanation PNGs and explain.json
(explanations). Pure functions and writers; no Lightning module lives here."""
