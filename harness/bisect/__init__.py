"""Bisection: find the first bad candidate (kernel, commit, initrd) in as few boots as possible.

- :mod:`~harness.bisect.search`: the search itself, over verdicts, with skips and ranges.
- :mod:`~harness.bisect.oracles`: judge a candidate by a boot or by a pytest node id.
- :mod:`~harness.bisect.verdicts`: the verdict cache, so a bisection never boots twice.

May import every stage up to :mod:`harness.snapshot`.
"""
