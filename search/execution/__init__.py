"""Running a search: the trial store, workers, fidelity, training candidates, the finish.

Imports the ledger, the strategies and the reporting views; nothing below imports it.
"""
