"""Reports: the results model, history, the HTML page, merged nightly pages, bundles, replay.

- :mod:`~harness.report.model`: one plain record per test, a run's results file (no pytest).
- :mod:`~harness.report.history`: since when a test fails, from earlier results.
- :mod:`~harness.report.html`: one self-contained page a person reads at a glance.
- :mod:`~harness.report.merge`: one page from the results of many CI jobs.
- :mod:`~harness.report.bundle` and :mod:`~harness.report.replay`: boot a failure again.

May import every stage up to :mod:`harness.bisect`; never pytest.
"""
