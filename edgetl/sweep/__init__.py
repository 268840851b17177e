"""`edgetl sweep`: search recipe fields for the most accurate model within a device's budget, on Ray Tune.

`spec` reads the sweep file, `space` turns it into Ray Tune's search space, searcher and
scheduler, `trial` runs one trial (a build) in a Ray worker, `run` drives the sweep, and
`output`/`page` write sweep.json, sweep.md, sweep.html and the best trial's recipe and
bundle. Needs `pip install 'edgetl[sweep]'` (Ray Tune, Optuna).
"""
