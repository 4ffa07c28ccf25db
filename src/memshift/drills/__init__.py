"""Fault drills: show, with figures, that nothing is lost under crashes, outages,
concurrency and hostile input, and that secrets and sessions stay where they belong.

``memshift drill [NAME ...] [--quick] [--json]`` runs them (:mod:`.runner`), each in
a scratch database and a key prefix of its own, and prints a table of figures per
drill (:mod:`.table`). One module per family: :mod:`.crash`, :mod:`.outage`,
:mod:`.concurrency`, :mod:`.hostile`, :mod:`.security`. docs/drills.md describes
each drill and its pass criteria.
"""
