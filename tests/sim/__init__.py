"""A deterministic simulation of the whole control plane, with faults (see ``world``).

``python -m tests.sim --schedules N`` runs N seeded schedules;
``tests/test_sim.py`` runs a few thousand in CI and shows a planted bug found.
"""
