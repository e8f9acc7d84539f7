"""The paper's comparisons: which runs a sweep needs (`plan`), where their finished
experiments are and what they committed (`experiments`, through DVC's Python API), and the
report built from them (`compare`). `flows/sweep.py` queues and runs the experiments.

Nothing is re-exported; import from the modules, e.g.
`from vregion.sweep.plan import plan_runs`.
"""
